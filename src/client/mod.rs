//! The client side: a connection to the server ([`session`]), the encrypted state ([`state`]),
//! the frames inside envelopes ([`frame`]), envelope key lifetimes ([`hybridkeys`]), KeyPackage
//! lifetimes ([`keypool`]), and the
//! messenger core ([`messenger`], [`delivery`], [`groups`], [`requests`] for consent to
//! strangers' invitations, and [`names`] for the names people see and the keys they type)
//! that the one-shot commands and the shell share. No printing in here.

pub mod delivery;
pub mod frame;
pub mod groups;
pub mod hybridkeys;
pub mod keypool;
pub mod messenger;
pub mod names;
pub mod requests;
pub mod session;
pub mod state;
