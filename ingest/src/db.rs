//! Connecting: create the database when missing, apply migrations, seed the built-in prices.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::error::StoreError;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connections per process; a batch holds one for its whole transaction.
pub const MAX_POOL_CONNECTIONS: u32 = 16;

/// Creates the database named in `url` when it does not exist yet, by connecting to the
/// server's `postgres` database.
pub async fn ensure_database(url: &str) -> Result<(), StoreError> {
    let opts = PgConnectOptions::from_str(url)?;
    let Some(name) = opts.get_database().map(str::to_string) else {
        return Ok(());
    };
    if opts.connect().await.is_ok() {
        return Ok(());
    }
    let mut admin = opts.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = name.replace('"', "\"\"");
        // Two processes may race to create it; the loser's "already exists" is success.
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{quoted}\"")))
            .execute(&mut admin)
            .await
        {
            let duplicate = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04");
            if !duplicate {
                return Err(e.into());
            }
        }
    }
    admin.close().await?;
    Ok(())
}

pub async fn connect(url: &str) -> Result<PgPool, StoreError> {
    ensure_database(url).await?;
    let opts = PgConnectOptions::from_str(url)?;
    let pool = PgPoolOptions::new()
        .max_connections(MAX_POOL_CONNECTIONS)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await?;
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
