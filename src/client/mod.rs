//! The client side: a connection to the server ([`session`]), the encrypted state ([`state`]),
//! what a DS payload is ([`parcel`]), the frames inside it ([`frame`]), envelope key lifetimes ([`hybridkeys`]), KeyPackage
//! lifetimes ([`keypool`]), membership events kept with history ([`timeline`]), the readers'
//! log of received messages ([`inbox`]), messages waiting to be sent ([`outbox`]), and the
//! messenger core ([`messenger`], [`delivery`], [`groups`], [`requests`] for consent to
//! strangers' invitations, and [`names`] for the names people see and the keys they type)
//! that the one-shot commands and the shell share. No printing in here.

pub mod db;
pub mod delivery;
pub mod frame;
pub mod groups;
pub mod history;
pub mod hybridkeys;
pub mod inbox;
pub mod keypool;
pub mod messenger;
pub mod names;
pub mod outbox;
pub mod parcel;
pub mod requests;
pub mod session;
pub mod state;
pub mod timeline;
pub mod vat;

#[cfg(test)]
pub(crate) mod testing;
