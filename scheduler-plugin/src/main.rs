//! `tessera-scheduler`: parses flags and runs the scheduler shell.

fn main() {}
