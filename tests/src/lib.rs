//! Test infrastructure for Tessera (see module docs).
