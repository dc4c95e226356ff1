//! Client-side cryptography that is not MLS itself: the user's identity, the hybrid
//! post-quantum envelope around every payload (and its
//! multi-recipient form, sealed once), and the encryption of the state file.
//! Pure code: no network, no files.

pub mod hybrid;
pub mod identity;
pub mod sealmany;
pub mod statefile;
