//! Placeholder until the Allocate benchmark is written.
fn main() {}
