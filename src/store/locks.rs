//! Short exclusive locks (`SET NX PX`), for work that must not run twice at
//! once across processes. A lock runs out on its own, so a holder that dies
//! cannot keep it.

use std::sync::LazyLock;

use redis::Script;

use super::{Store, StoreResult};

pub static RELEASE_LOCK: LazyLock<Script> = lua_script!("release_lock.lua");

/// A held lock; dropping it releases it (in the background, so a request
/// dropped by its timeout releases it too).
pub struct Lock {
    store: Store,
    key: String,
    token: String,
}

impl Lock {
    /// The lock, or `None` while someone else holds it.
    pub async fn acquire(
        store: &Store,
        key: impl Into<String>,
        ttl_ms: u64,
    ) -> StoreResult<Option<Self>> {
        let key = key.into();
        let token = uuid::Uuid::now_v7().to_string();
        let mut conn = store.conn().await?;
        let acquired: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut conn)
            .await?;
        Ok(acquired.map(|_| Lock {
            store: store.clone(),
            key,
            token,
        }))
    }
}

impl Lock {
    /// The holder's token: a script that must run only under the lock
    /// checks it.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Releases the lock now, so that this process can take it again at
    /// once (dropping it releases it in the background).
    pub async fn release(mut self) -> StoreResult<()> {
        let token = std::mem::take(&mut self.token);
        let key = std::mem::take(&mut self.key);
        let mut conn = self.store.conn().await?;
        RELEASE_LOCK
            .key(&key)
            .arg(&token)
            .invoke_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if self.token.is_empty() {
            return; // released already
        }
        let (store, key, token) = (
            self.store.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        tokio::spawn(async move {
            let released = async {
                let mut conn = store.conn().await?;
                RELEASE_LOCK
                    .key(&key)
                    .arg(&token)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(super::StoreError::from)
            };
            if let Err(err) = released.await {
                tracing::warn!(error = %err, key = %key, "releasing a lock failed; it runs out on its own");
            }
        });
    }
}
