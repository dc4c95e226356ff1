//! Test support shared by the client's unit tests: a messenger on a fresh home, offline.

use std::path::Path;

use crate::client::messenger::{ConnectOptions, Messenger};
use crate::client::state::{Home, Secrets, State, Unlock};
use crate::mls::MlsClient;

/// A messenger on a fresh home in `dir`, offline (nothing that uses it needs the server).
pub(crate) fn offline_messenger(dir: &Path) -> Messenger {
    let seed: [u8; 32] = rand::random();
    let mut state = State::new(Secrets::new(seed, rand::random()), None, None);
    state.mls_storage = crate::mls::MlsClient::new(&seed).unwrap().export_storage().unwrap();
    drop(Home::create(dir, state, Unlock::None).unwrap());
    Messenger::open(dir, None, ConnectOptions::default()).unwrap()
}

/// Bob receives `welcome` from `inviter`, labelled a direct conversation with them; returns
/// what it told him.
pub(crate) fn receive_direct_welcome(
    bob: &mut Messenger,
    inviter: &MlsClient,
    welcome: &[u8],
) -> Vec<crate::client::messenger::Event> {
    let mut events = Vec::new();
    let peer = inviter.identity();
    bob.handle_welcome(welcome, "", crate::client::state::GroupKind::Direct { peer }, peer, &mut events);
    events
}

/// Bob (an offline messenger in `dir`) with carol as his contact, and eve, a stranger: the
/// cast of the tests of who a conversation holds. Carol and eve are bare MLS clients.
pub(crate) fn bob_carol_and_eve(dir: &Path) -> (Messenger, MlsClient, MlsClient) {
    let mut bob = offline_messenger(dir);
    let carol = MlsClient::new(&rand::random()).unwrap();
    let eve = MlsClient::new(&rand::random()).unwrap();
    bob.home.state.contacts.insert("carol".into(), carol.identity());
    (bob, carol, eve)
}
