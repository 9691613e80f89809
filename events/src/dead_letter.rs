//! Dead letters: what a consumer writes to `<topic>.DLT` when it parks a message it cannot
//! apply, and what every reader of that topic (`mall-topic watch --dlt`, the test suites)
//! decodes. One constructor per failure kind, so the reason is always typed.
//!
//! A dead letter always fits on the topic: it carries at most [`PREVIEW_BYTES`] of the parked
//! payload, with the payload's full size and SHA-256, so a 200 KB (or 200 MB) poison message
//! still parks as a record of a few KB.

use crate::Service;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// How many bytes of the parked payload a dead letter copies.
pub const PREVIEW_BYTES: usize = 2048;

/// Why a message was parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeadLetterKind {
    /// The bytes are not an event of this contract.
    Undecodable,
    /// A well-formed event the service's rules cannot accept (retrying cannot help).
    Rejected,
    /// The service's handler panicked on it; a bug that would repeat.
    HandlerPanicked,
}

/// Where the parked message was and who parked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedFrom {
    /// The consumer group (service) that parked it.
    pub consumer_group: String,
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, if any (lossy UTF-8).
    pub key: Option<String>,
}

/// One record on the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// Why, as a type.
    pub kind: DeadLetterKind,
    /// Why, for a person.
    pub reason: String,
    /// The consumer group (service) that parked it.
    pub consumer_group: String,
    /// The topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key (lossy UTF-8), if any.
    pub key: Option<String>,
    /// Size of the parked payload.
    pub payload_bytes: usize,
    /// SHA-256 of the parked payload, hex.
    pub payload_sha256: String,
    /// The first [`PREVIEW_BYTES`] of the payload, lossy UTF-8.
    pub payload_preview: String,
    /// True when the preview is not the whole payload.
    pub payload_truncated: bool,
    /// When it was parked, RFC 3339.
    pub parked_at: String,
}

impl DeadLetter {
    /// A message that is not an event of this contract.
    pub fn undecodable(from: ParkedFrom, payload: &[u8], reason: impl Into<String>) -> Self {
        Self::new(DeadLetterKind::Undecodable, from, payload, reason.into())
    }

    /// An event the service's rules refuse.
    pub fn rejected(from: ParkedFrom, payload: &[u8], reason: impl Into<String>) -> Self {
        Self::new(DeadLetterKind::Rejected, from, payload, reason.into())
    }

    /// An event whose handler panicked.
    pub fn handler_panicked(from: ParkedFrom, payload: &[u8], reason: impl Into<String>) -> Self {
        Self::new(
            DeadLetterKind::HandlerPanicked,
            from,
            payload,
            reason.into(),
        )
    }

    fn new(kind: DeadLetterKind, from: ParkedFrom, payload: &[u8], reason: String) -> Self {
        let preview = &payload[..payload.len().min(PREVIEW_BYTES)];
        DeadLetter {
            kind,
            // A reason quoting the payload (a serde error) is bounded too.
            // Stored as text (PostgreSQL holds no NUL), so a NUL shows as `\u0000`.
            reason: visible_nul(&truncate(&reason, PREVIEW_BYTES)),
            consumer_group: visible_nul(&from.consumer_group),
            topic: visible_nul(&from.topic),
            partition: from.partition,
            offset: from.offset,
            key: from.key.map(|k| visible_nul(&truncate(&k, 256))),
            payload_bytes: payload.len(),
            payload_sha256: hex(&Sha256::digest(payload)),
            payload_preview: String::from_utf8_lossy(preview).into_owned(),
            payload_truncated: preview.len() < payload.len(),
            parked_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    /// The JSON written to the dead-letter topic.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Reads a dead-letter record.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// What a service did with a saga event it parked, announced on the saga topic keyed by the
/// event's order (`EventParked`, then `DeadLetterRedriven` or `DeadLetterDiscarded`), in the
/// same transaction as the parking, the redrive or the discard. The order's saga may wait on
/// a parked event, so orders records these in the order's history and shows the order's open
/// ones in its GET and on the dashboard; the other services skip them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterNote {
    /// The order the parked event belongs to.
    pub order_id: i64,
    /// The service that parked it; dead-letter ids are that service's.
    pub service: Service,
    /// The dead letter's id in that service (`GET /dead-letters/{id}`).
    pub dead_letter_id: i64,
    /// The parked event's type.
    pub parked_event_type: String,
    /// The parked event's id.
    pub parked_event_id: Uuid,
    /// Why it was parked, why it was discarded, or what the redrive did.
    pub state_message: String,
    /// A redrive's new event id (the copy on the saga topic); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive_event_id: Option<Uuid>,
}

/// The Kafka header a redriven event carries: the `eventId` of the parked original.
pub const REDRIVE_OF_HEADER: &str = "redriveOf";
/// The Kafka header a redriven event carries: the consumer group (service) that parked the
/// original and is the only one to apply the copy (the others applied the original).
pub const REDRIVE_FOR_HEADER: &str = "redriveFor";

/// `text` with each NUL written as the six characters `\u0000`.
fn visible_nul(text: &str) -> String {
    text.replace('\0', "\\u0000")
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from() -> ParkedFrom {
        ParkedFrom {
            consumer_group: "products".into(),
            topic: "eventTopic".into(),
            partition: 2,
            offset: 41,
            key: Some("poison-1".into()),
        }
    }

    #[test]
    fn a_huge_payload_parks_as_a_small_record_with_its_size_and_hash() {
        let payload = vec![0u8; 200_000];
        let letter = DeadLetter::undecodable(from(), &payload, "not a JSON object");
        let json = letter.to_json();
        // NUL escapes to \u0000 (6 bytes): the whole payload would be 1.2 MB.
        assert!(json.len() < 8 * PREVIEW_BYTES, "{} bytes", json.len());
        assert_eq!(letter.payload_bytes, 200_000);
        assert!(letter.payload_truncated);
        assert_eq!(letter.payload_sha256.len(), 64);
        assert_eq!(DeadLetter::decode(json.as_bytes()).unwrap(), letter);
    }

    /// The hash is the whole payload's, not the preview's: known values (`sha256sum`).
    #[test]
    fn the_sha256_is_the_whole_payloads() {
        let nul = DeadLetter::undecodable(from(), &[0u8; 200_000], "not JSON");
        assert_eq!(
            nul.payload_sha256,
            "4cbbd9be0cba685835755f827758705db5a413c5494c34262cd25946a73e7582"
        );
        let abc = DeadLetter::rejected(from(), b"abc", "refused");
        assert_eq!(
            abc.payload_sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_small_payload_is_copied_whole_and_each_kind_is_named() {
        let letter = DeadLetter::rejected(from(), b"{\"x\":1}", "order 9 does not exist");
        assert_eq!(letter.payload_preview, "{\"x\":1}");
        assert!(!letter.payload_truncated);
        assert!(letter.to_json().contains("\"kind\":\"Rejected\""));
        let panicked = DeadLetter::handler_panicked(from(), b"", "boom");
        assert_eq!(panicked.kind, DeadLetterKind::HandlerPanicked);
    }

    #[test]
    fn a_long_reason_is_bounded_on_a_char_boundary() {
        let reason = "é".repeat(PREVIEW_BYTES);
        let letter = DeadLetter::undecodable(from(), b"x", reason);
        assert!(letter.reason.len() <= PREVIEW_BYTES + 3);
    }
}
