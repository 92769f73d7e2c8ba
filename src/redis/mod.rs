//! The Redis adapter: the only code that holds `unsafe`, and the one place
//! that handles the hazards of shared/field-notes.md.

pub mod blocked;
pub mod events;
pub mod ffi;
pub mod guard;
pub mod keyspace;
pub mod keywait;
