//! openraft's storage conformance suite on hamail's log store and state
//! machine (a fresh pair in a temporary directory for each case).

use std::sync::Arc;

use hamail_cluster::log_store::LogStore;
use hamail_cluster::state_machine::StateMachine;
use hamail_cluster::{StorageError, TypeConfig};
use hamail_store::{LocalStore, StoreOptions};
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            LocalStore::open(&dir.path().join("store"), StoreOptions { fsync: false, ..StoreOptions::default() })
                .expect("open store");
        let log = LogStore::open(&dir.path().join("raft-log.redb"))?;
        let sm = StateMachine::open(Arc::clone(&store), dir.path()).await?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("storage suite");
}
