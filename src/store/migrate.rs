//! Opening a database file written by an older qpq: version 3 is migrated in place (in the
//! open transaction, so a failed migration leaves the file as it was); older versions are
//! refused by name ([`super::StoreError::SchemaVersion`]).

use std::collections::HashMap;

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{CHANNEL_SEQ_FLOOR, CHANNELS, META, QUEUE, QUEUE_META, SEQ_FLOOR, StoreError, StoredMessage};

/// Version 3's `channels`: channel id -> last channel_seq.
const CHANNELS_V3: TableDefinition<&[u8], u64> = TableDefinition::new("channels");

/// 3 -> 4: `channels` values gain the count of queued messages per channel, counted once from
/// the queue; rows of empty queues and unused channels are deleted, their numbers kept as the
/// floors (see the invariant in [`super`]).
pub(super) fn from_3(txn: &WriteTransaction) -> Result<(), StoreError> {
    let old: Vec<(Vec<u8>, u64)> = {
        let table = txn.open_table(CHANNELS_V3)?;
        let mut rows = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            rows.push((k.value().to_vec(), v.value()));
        }
        rows
    };
    let mut live: HashMap<Vec<u8>, u64> = HashMap::new();
    for entry in txn.open_table(QUEUE)?.iter()? {
        let (_, v) = entry?;
        // A damaged row counts for no channel; the sweep deletes it.
        if let Ok((_, _, channel, _)) = StoredMessage::parts(0, v.value())
            && !channel.is_empty()
        {
            *live.entry(channel.to_vec()).or_default() += 1;
        }
    }
    txn.delete_table(CHANNELS_V3)?;
    let mut channel_floor = 0u64;
    {
        let mut channels = txn.open_table(CHANNELS)?;
        for (id, last) in old {
            match live.get(&id) {
                Some(&count) => {
                    channels.insert(&id[..], (last, count))?;
                }
                None => channel_floor = channel_floor.max(last),
            }
        }
    }
    let mut seq_floor = 1u64;
    {
        let mut queue_meta = txn.open_table(QUEUE_META)?;
        let mut empty = Vec::new();
        for entry in queue_meta.iter()? {
            let (k, v) = entry?;
            let (next, count, _) = v.value();
            if count == 0 {
                empty.push(k.value().to_vec());
                seq_floor = seq_floor.max(next);
            }
        }
        for k in empty {
            queue_meta.remove(&k[..])?;
        }
    }
    let mut meta = txn.open_table(META)?;
    meta.insert(SEQ_FLOOR, seq_floor)?;
    meta.insert(CHANNEL_SEQ_FLOOR, channel_floor)?;
    Ok(())
}
