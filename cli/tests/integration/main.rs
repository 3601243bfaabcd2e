//! The cli crate's integration tests, linked into one test binary so a
//! build links (and stores) one executable instead of one per file.

mod inspect;
mod simulate;
