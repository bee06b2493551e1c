//! Provider keys at rest: sealed with ChaCha20-Poly1305 under a key-encryption key (KEK) from
//! config, bound to their account and credential, and masked whenever they are shown.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore as _;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret as _, SecretString};

pub const KEK_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
/// Keys shorter than this are masked to nothing at all: 7 shown characters of a short key would
/// give away too much of it.
pub const MASK_MIN_CHARS: usize = 16;
const MASK_PREFIX_CHARS: usize = 3;
const MASK_SUFFIX_CHARS: usize = 4;
/// Versioned, so a future change of the associated-data layout cannot open old ciphertexts by
/// accident.
const AAD_DOMAIN: &[u8] = b"tally/provider-key/v1";

/// Messages name what was wrong with a secret, never its value: they end up in logs and in the
/// startup error of a misconfigured process.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("the key-encryption key is not valid base64")]
    KekNotBase64,
    #[error("the key-encryption key must decode to {KEK_LEN} bytes, got {0}")]
    KekLength(usize),
    #[error("a sealed provider key has a {0}-byte nonce, expected {NONCE_LEN}")]
    NonceLength(usize),
    #[error("sealing a provider key failed")]
    Seal,
    /// Wrong KEK, tampered ciphertext, or a ciphertext moved to another account or credential.
    #[error(
        "a sealed provider key does not open under this key-encryption key, account and credential"
    )]
    Open,
    #[error("an opened provider key is not UTF-8")]
    NotUtf8,
}

/// The key-encryption key. The cipher zeroizes its key when dropped; `Debug` shows nothing.
pub struct Kek {
    cipher: ChaCha20Poly1305,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek([REDACTED])")
    }
}

impl Kek {
    /// Reads a KEK written as standard base64 (e.g. `openssl rand -base64 32`). Surrounding
    /// whitespace is ignored, since config files and secret mounts often end in a newline.
    pub fn from_base64(value: &str) -> Result<Kek, SecretsError> {
        let bytes = Zeroizing::new(
            STANDARD
                .decode(value.trim())
                .map_err(|_| SecretsError::KekNotBase64)?,
        );
        let key: &[u8; KEK_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SecretsError::KekLength(bytes.len()))?;
        Ok(Kek::from_bytes(key))
    }

    pub fn from_bytes(key: &[u8; KEK_LEN]) -> Kek {
        Kek {
            cipher: ChaCha20Poly1305::new(&Key::from(*key)),
        }
    }
}

/// A sealed provider key as stored: a random nonce and the ciphertext with its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: [u8; NONCE_LEN],
    pub ciphertext: Vec<u8>,
}

impl Sealed {
    /// Rebuilds a sealed value from its stored columns.
    pub fn from_parts(nonce: &[u8], ciphertext: Vec<u8>) -> Result<Sealed, SecretsError> {
        let nonce = nonce
            .try_into()
            .map_err(|_| SecretsError::NonceLength(nonce.len()))?;
        Ok(Sealed { nonce, ciphertext })
    }
}

/// Length-prefixed, so `("ab", "c")` and `("a", "bc")` are different associated data.
fn associated_data(account_id: &str, credential_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 8 + account_id.len() + credential_id.len());
    aad.extend_from_slice(AAD_DOMAIN);
    for part in [account_id, credential_id] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

/// Seals `plaintext` for one credential of one account, under a fresh random 96-bit nonce.
pub fn seal(
    kek: &Kek,
    account_id: &str,
    credential_id: &str,
    plaintext: &SecretString,
) -> Result<Sealed, SecretsError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let aad = associated_data(account_id, credential_id);
    let ciphertext = kek
        .cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext.expose_secret().as_bytes(),
                aad: &aad,
            },
        )
        .map_err(|_| SecretsError::Seal)?;
    Ok(Sealed { nonce, ciphertext })
}

/// Opens a provider key sealed by [`seal`] for the same account and credential.
pub fn open(
    kek: &Kek,
    account_id: &str,
    credential_id: &str,
    sealed: &Sealed,
) -> Result<SecretString, SecretsError> {
    let aad = associated_data(account_id, credential_id);
    let plaintext = kek
        .cipher
        .decrypt(
            &Nonce::from(sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| SecretsError::Open)?;
    match String::from_utf8(plaintext) {
        Ok(s) => Ok(SecretString::from(s)),
        Err(e) => {
            // The bytes are still secret even when they are not text.
            drop(Zeroizing::new(e.into_bytes()));
            Err(SecretsError::NotUtf8)
        }
    }
}

/// The only form of a provider key ever shown after creation: at most the first 3 and the last 4
/// characters (`sk-…a1b2`), and nothing but `…` for keys too short to spare them.
pub fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < MASK_MIN_CHARS {
        return "…".to_string();
    }
    let prefix: String = chars.iter().take(MASK_PREFIX_CHARS).collect();
    let suffix: String = chars[chars.len() - MASK_SUFFIX_CHARS..].iter().collect();
    format!("{prefix}…{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> Kek {
        Kek::from_bytes(&[byte; KEK_LEN])
    }

    #[test]
    fn seal_then_open_round_trips() {
        let k = kek(7);
        let key = SecretString::from("sk-live-0123456789abcdef");
        let sealed = seal(&k, "acct_1", "cred_1", &key).unwrap();
        let opened = open(&k, "acct_1", "cred_1", &sealed).unwrap();
        assert_eq!(opened.expose_secret(), key.expose_secret());
    }

    #[test]
    fn open_refuses_other_account_credential_or_kek() {
        let k = kek(7);
        let key = SecretString::from("sk-live-0123456789abcdef");
        let sealed = seal(&k, "acct_1", "cred_1", &key).unwrap();
        assert!(matches!(
            open(&k, "acct_2", "cred_1", &sealed),
            Err(SecretsError::Open)
        ));
        assert!(matches!(
            open(&k, "acct_1", "cred_2", &sealed),
            Err(SecretsError::Open)
        ));
        // The length prefix keeps the boundary between the two ids.
        assert!(open(&k, "acct_1c", "red_1", &sealed).is_err());
        assert!(open(&kek(8), "acct_1", "cred_1", &sealed).is_err());
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert!(open(&k, "acct_1", "cred_1", &tampered).is_err());
    }

    #[test]
    fn nonces_differ_between_seals() {
        let k = kek(1);
        let key = SecretString::from("sk-live-0123456789abcdef");
        let a = seal(&k, "a", "c", &key).unwrap();
        let b = seal(&k, "a", "c", &key).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn kek_errors_do_not_echo_the_value() {
        let bad = "not*base64*sk-secret-material";
        let e = Kek::from_base64(bad).unwrap_err();
        assert!(!e.to_string().contains("sk-secret"));
        assert!(matches!(e, SecretsError::KekNotBase64));
        let short = STANDARD.encode([1u8; 16]);
        let e = Kek::from_base64(&short).unwrap_err();
        assert!(matches!(e, SecretsError::KekLength(16)));
        assert!(!e.to_string().contains(&short));
        let ok = format!("{}\n", STANDARD.encode([9u8; KEK_LEN]));
        assert!(Kek::from_base64(&ok).is_ok());
        assert_eq!(
            format!("{:?}", Kek::from_base64(&ok).unwrap()),
            "Kek([REDACTED])"
        );
    }

    #[test]
    fn mask_shows_little() {
        assert_eq!(mask("sk-proj-abcdefghijklmnopa1b2"), "sk-…a1b2");
        assert_eq!(mask("short-key"), "…");
        assert_eq!(mask(""), "…");
        assert_eq!(mask("ééééééééééééééééabcd"), "ééé…abcd");
    }

    #[test]
    fn secret_debug_is_redacted() {
        let key = SecretString::from("sk-canary-value");
        assert!(!format!("{key:?}").contains("canary"));
    }
}
