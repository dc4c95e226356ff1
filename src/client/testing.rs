//! Test support shared by the client's unit tests: a messenger on a fresh home, offline.

use std::path::Path;

use crate::client::messenger::{ConnectOptions, Messenger};
use crate::client::state::{Home, Secrets, State, Unlock};

/// A messenger on a fresh home in `dir`, offline (nothing that uses it needs the server).
pub(crate) fn offline_messenger(dir: &Path) -> Messenger {
    let seed: [u8; 32] = rand::random();
    let mut state = State::new(Secrets::new(seed, rand::random()), None, None);
    state.mls_storage = crate::mls::MlsClient::new(&seed).unwrap().export_storage().unwrap();
    drop(Home::create(dir, state, Unlock::None).unwrap());
    Messenger::open(dir, None, ConnectOptions::default()).unwrap()
}
