//! burn records as checkpoint shard buffers and back, without a copy on the way out.

/// A burn record's buffer as a shard's, without a copy.
pub fn shared(record: burn::tensor::Bytes) -> bytes::Bytes {
    struct Record(burn::tensor::Bytes);
    impl AsRef<[u8]> for Record {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    bytes::Bytes::from_owner(Record(record))
}

/// A shard's buffer as a burn record's (aligned as burnpack's reader wants it).
pub fn record(bytes: bytes::Bytes) -> burn::tensor::Bytes {
    burn::tensor::Bytes::from_bytes_vec(Vec::from(bytes))
}
