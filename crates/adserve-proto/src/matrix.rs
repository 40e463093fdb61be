//! `adserve.v1.FeatureMatrix`, with a protobuf codec that moves its number
//! blocks in bulk.
//!
//! Why this one message is not left to `prost-derive`: a feature matrix of
//! 1000 candidates carries about 30 000 floats, and it crosses the wire twice
//! per ad request (feature-service → gateway → ranker). prost decodes a packed `repeated float` one value at a
//! time through the `Buf` trait, growing the vector as it goes, and encodes
//! it one `put_f32_le` at a time. In a profile of the ranker under
//! `make bench-ranker` (DCN-v2, 2026-12-05), decoding matrices took a
//! quarter as much CPU as the model's own runs.
//!
//! The wire format is the proto's, unchanged. A packed `repeated float` is
//! its values' little-endian bytes after a length, so this codec copies a
//! block in bulk; a packed `repeated int64` block is encoded through a
//! staging buffer and decoded from one contiguous slice. Everything else
//! (the strings, `num_rows`, unpacked encodings, and every malformed input,
//! with prost's own errors) goes through prost's field codecs.
//!
//! `proto/adserve/v1/common.proto` stays the one definition. The tests check
//! this type against the message `prost-derive` generates from it (byte for
//! byte, both ways, on random matrices, whole and in pieces, and on damaged
//! encodings), and its field table against the compiled descriptor, so a
//! field added to the proto and not here fails them.
use prost::{
    DecodeError, Message,
    bytes::{Buf, BufMut},
    encoding::{self, DecodeContext, WireType, decode_varint, encode_key, encode_varint, encoded_len_varint},
};

/// A dense feature matrix for a batch of candidates, row-major, with its
/// categorical ids and embeddings in blocks of their own (see
/// `adserve.v1.FeatureMatrix` in `proto/adserve/v1/common.proto`).
#[derive(Clone, PartialEq, Default, Debug)]
pub struct FeatureMatrix {
    /// Dense column names, in column order.
    pub feature_names: Vec<String>,
    /// Number of rows (candidates).
    pub num_rows: u32,
    /// num_rows * feature_names.size() values, row-major.
    pub values: Vec<f32>,
    /// Categorical column names, in their registry order.
    pub categorical_names: Vec<String>,
    /// num_rows * categorical_names.size() bucket ids, row-major (0: missing).
    pub categorical_ids: Vec<i64>,
    /// Embedding column names, in their registry order.
    pub embedding_names: Vec<String>,
    /// Each embedding column's length, aligned with embedding_names.
    pub embedding_dims: Vec<u32>,
    /// num_rows * sum(embedding_dims) values, row-major: a row holds its
    /// embeddings one after the other, in column order.
    pub embedding_values: Vec<f32>,
}

/// The proto's fields as this codec knows them: (number, name, proto type).
/// The tests compare it with the compiled descriptor.
pub const FIELDS: [(u32, &str, &str); 8] = [
    (1, "feature_names", "repeated string"),
    (2, "num_rows", "uint32"),
    (3, "values", "repeated float"),
    (4, "categorical_names", "repeated string"),
    (5, "categorical_ids", "repeated int64"),
    (6, "embedding_names", "repeated string"),
    (7, "embedding_dims", "repeated uint32"),
    (8, "embedding_values", "repeated float"),
];

impl Message for FeatureMatrix {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::string::encode_repeated(1, &self.feature_names, buf);
        if self.num_rows != 0 {
            encoding::uint32::encode(2, &self.num_rows, buf);
        }
        f32_block::encode(3, &self.values, buf);
        encoding::string::encode_repeated(4, &self.categorical_names, buf);
        i64_block::encode(5, &self.categorical_ids, buf);
        encoding::string::encode_repeated(6, &self.embedding_names, buf);
        encoding::uint32::encode_packed(7, &self.embedding_dims, buf);
        f32_block::encode(8, &self.embedding_values, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let (field, merged) = match tag {
            1 => ("feature_names", encoding::string::merge_repeated(wire_type, &mut self.feature_names, buf, ctx)),
            2 => ("num_rows", encoding::uint32::merge(wire_type, &mut self.num_rows, buf, ctx)),
            3 => ("values", f32_block::merge(wire_type, &mut self.values, buf, ctx)),
            4 => (
                "categorical_names",
                encoding::string::merge_repeated(wire_type, &mut self.categorical_names, buf, ctx),
            ),
            5 => ("categorical_ids", i64_block::merge(wire_type, &mut self.categorical_ids, buf, ctx)),
            6 => ("embedding_names", encoding::string::merge_repeated(wire_type, &mut self.embedding_names, buf, ctx)),
            7 => ("embedding_dims", encoding::uint32::merge_repeated(wire_type, &mut self.embedding_dims, buf, ctx)),
            8 => ("embedding_values", f32_block::merge(wire_type, &mut self.embedding_values, buf, ctx)),
            _ => return encoding::skip_field(wire_type, tag, buf, ctx),
        };
        merged.map_err(|mut e| {
            e.push("FeatureMatrix", field);
            e
        })
    }

    fn encoded_len(&self) -> usize {
        encoding::string::encoded_len_repeated(1, &self.feature_names)
            + if self.num_rows != 0 { encoding::uint32::encoded_len(2, &self.num_rows) } else { 0 }
            + encoding::float::encoded_len_packed(3, &self.values)
            + encoding::string::encoded_len_repeated(4, &self.categorical_names)
            + encoding::int64::encoded_len_packed(5, &self.categorical_ids)
            + encoding::string::encoded_len_repeated(6, &self.embedding_names)
            + encoding::uint32::encoded_len_packed(7, &self.embedding_dims)
            + encoding::float::encoded_len_packed(8, &self.embedding_values)
    }

    fn clear(&mut self) {
        // Field by field, so the vectors keep their capacity (as prost-derive's clear does).
        self.feature_names.clear();
        self.num_rows = 0;
        self.values.clear();
        self.categorical_names.clear();
        self.categorical_ids.clear();
        self.embedding_names.clear();
        self.embedding_dims.clear();
        self.embedding_values.clear();
    }
}

/// The length of a length-delimited field, read from the buffer's first
/// chunk without consuming it: `(header bytes, payload bytes)`, when the
/// varint is whole in that chunk and the payload is within the buffer.
fn peek_length(buf: &impl Buf) -> Option<(usize, usize)> {
    let mut head = buf.chunk();
    let before = head.len();
    let len = usize::try_from(decode_varint(&mut head).ok()?).ok()?;
    let header = before - head.len();
    (len <= buf.remaining() - header).then_some((header, len))
}

/// A packed `repeated float`: its values' little-endian bytes.
mod f32_block {
    use super::*;

    /// Values staged per `put_slice` while encoding.
    const STAGE: usize = 1024;

    pub(super) fn encode(tag: u32, values: &[f32], buf: &mut impl BufMut) {
        if values.is_empty() {
            return;
        }
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(values.len() as u64 * 4, buf);
        let mut stage = [0u8; STAGE * 4];
        for part in values.chunks(STAGE) {
            let bytes = &mut stage[..part.len() * 4];
            for (to, v) in bytes.chunks_exact_mut(4).zip(part) {
                to.copy_from_slice(&v.to_le_bytes());
            }
            buf.put_slice(bytes);
        }
    }

    /// A well-formed packed block is copied in bulk; anything else (an
    /// unpacked value, a length that is not a multiple of 4 or runs past
    /// the buffer, a length varint split across chunks) is prost's to
    /// decode or refuse.
    pub(super) fn merge(
        wire_type: WireType,
        values: &mut Vec<f32>,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if wire_type == WireType::LengthDelimited
            && let Some((header, len)) = peek_length(buf).filter(|(_, len)| len % 4 == 0)
        {
            buf.advance(header);
            values.reserve(len / 4);
            let mut left = len;
            while left > 0 {
                let chunk = buf.chunk();
                let take = chunk.len().min(left) / 4 * 4;
                if take == 0 {
                    // A value split across two chunks.
                    values.push(buf.get_f32_le());
                    left -= 4;
                    continue;
                }
                values.extend(chunk[..take].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                buf.advance(take);
                left -= take;
            }
            return Ok(());
        }
        encoding::float::merge_repeated(wire_type, values, buf, ctx)
    }
}

/// A packed `repeated int64`: varints, staged per `put_slice` when
/// encoding, decoded from one slice when the block is contiguous.
mod i64_block {
    use super::*;

    /// Bytes staged per `put_slice` while encoding.
    const STAGE: usize = 4096;

    pub(super) fn encode(tag: u32, values: &[i64], buf: &mut impl BufMut) {
        if values.is_empty() {
            return;
        }
        encode_key(tag, WireType::LengthDelimited, buf);
        let len: usize = values.iter().map(|v| encoded_len_varint(*v as u64)).sum();
        encode_varint(len as u64, buf);
        // A varint is at most 10 bytes, and a value starts below STAGE.
        let mut stage = [0u8; STAGE + 10];
        let mut at = 0;
        for &v in values {
            let mut v = v as u64;
            while v >= 0x80 {
                stage[at] = v as u8 | 0x80;
                v >>= 7;
                at += 1;
            }
            stage[at] = v as u8;
            at += 1;
            if at >= STAGE {
                buf.put_slice(&stage[..at]);
                at = 0;
            }
        }
        buf.put_slice(&stage[..at]);
    }

    pub(super) fn merge(
        wire_type: WireType,
        values: &mut Vec<i64>,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if wire_type == WireType::LengthDelimited
            && let Some((header, len)) = peek_length(buf)
            && buf.chunk().len() >= header + len
        {
            let mut block = &buf.chunk()[header..header + len];
            // At least one byte per value.
            values.reserve(len / 2);
            while !block.is_empty() {
                // A varint running past the block is an error here, as in prost.
                values.push(decode_varint(&mut block)? as i64);
            }
            buf.advance(header + len);
            return Ok(());
        }
        encoding::int64::merge_repeated(wire_type, values, buf, ctx)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message as _;

    use super::FeatureMatrix;
    use crate::reference::adserve::v1::FeatureMatrix as Derived;

    fn to_derived(m: &FeatureMatrix) -> Derived {
        Derived {
            feature_names: m.feature_names.clone(),
            num_rows: m.num_rows,
            values: m.values.clone(),
            categorical_names: m.categorical_names.clone(),
            categorical_ids: m.categorical_ids.clone(),
            embedding_names: m.embedding_names.clone(),
            embedding_dims: m.embedding_dims.clone(),
            embedding_values: m.embedding_values.clone(),
        }
    }

    /// Equal including NaN payloads (the codec moves bits, not numbers).
    fn same(ours: &FeatureMatrix, derived: &Derived) -> bool {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        ours.feature_names == derived.feature_names
            && ours.num_rows == derived.num_rows
            && bits(&ours.values) == bits(&derived.values)
            && ours.categorical_names == derived.categorical_names
            && ours.categorical_ids == derived.categorical_ids
            && ours.embedding_names == derived.embedding_names
            && ours.embedding_dims == derived.embedding_dims
            && bits(&ours.embedding_values) == bits(&derived.embedding_values)
    }

    fn any_f32() -> impl Strategy<Value = f32> {
        prop_oneof![any::<f32>(), Just(f32::NAN), Just(-0.0f32), Just(f32::INFINITY), -1e3f32..1e3]
    }

    prop_compose! {
        fn matrix()(
            feature_names in prop::collection::vec("[a-z_]{0,12}", 0..6),
            num_rows in prop_oneof![Just(0u32), any::<u32>(), 0u32..2000],
            // Past the float stage (1024 values) and the id stage (4096
            // bytes), so the encoders' loops run more than once.
            values in prop::collection::vec(any_f32(), 0..3000),
            categorical_names in prop::collection::vec("[a-zé_]{0,8}", 0..4),
            categorical_ids in prop::collection::vec(prop_oneof![any::<i64>(), 0i64..300, Just(i64::MIN)], 0..1200),
            embedding_names in prop::collection::vec("[a-z]{1,6}", 0..3),
            embedding_dims in prop::collection::vec(any::<u32>(), 0..3),
            embedding_values in prop::collection::vec(any_f32(), 0..200),
        ) -> FeatureMatrix {
            FeatureMatrix {
                feature_names, num_rows, values, categorical_names, categorical_ids,
                embedding_names, embedding_dims, embedding_values,
            }
        }
    }

    /// `bytes` cut into pieces at `cuts`, as a network read would hand them
    /// over (the codec's slow paths run where a value or a length varint
    /// straddles two pieces).
    fn chunked(bytes: &[u8], cuts: &[usize]) -> impl prost::bytes::Buf {
        use prost::bytes::{Buf, Bytes};
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        at.extend([0, bytes.len()]);
        at.sort_unstable();
        at.dedup();
        let mut out: Box<dyn Buf> = Box::new(Bytes::new());
        for w in at.windows(2) {
            out = Box::new(out.chain(Bytes::copy_from_slice(&bytes[w[0]..w[1]])));
        }
        out
    }

    proptest! {
        #[test]
        fn encodes_byte_for_byte_as_prost_derive(m in matrix()) {
            let ours = m.encode_to_vec();
            prop_assert_eq!(ours.len(), m.encoded_len());
            prop_assert_eq!(&ours, &to_derived(&m).encode_to_vec());
        }

        #[test]
        fn decodes_what_prost_derive_encodes_whole_or_in_pieces(
            m in matrix(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let bytes = to_derived(&m).encode_to_vec();
            let ours = FeatureMatrix::decode(bytes.as_slice()).unwrap();
            prop_assert!(same(&ours, &to_derived(&m)));
            let pieces = FeatureMatrix::decode(chunked(&bytes, &cuts)).unwrap();
            prop_assert!(same(&pieces, &to_derived(&m)));
        }

        /// Damaged input (truncated, a byte changed): the same verdict as
        /// prost-derive's decoder, and the same message when both accept.
        #[test]
        fn damaged_encodings_get_prost_derives_verdict(
            m in matrix(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
        ) {
            let good = m.encode_to_vec();
            prop_assume!(!good.is_empty());
            let truncated = good[..cut.index(good.len())].to_vec();
            let mut flipped = good.clone();
            flipped[flip.index(good.len())] = byte;
            for bytes in [truncated, flipped] {
                let derived = Derived::decode(bytes.as_slice());
                for ours in [FeatureMatrix::decode(bytes.as_slice()), FeatureMatrix::decode(chunked(&bytes, &cuts))] {
                    match (&ours, &derived) {
                        (Ok(o), Ok(d)) => prop_assert!(same(o, d)),
                        (Err(_), Err(_)) => {}
                        _ => prop_assert!(false, "ours {:?}, prost-derive {:?}", ours.is_ok(), derived.is_ok()),
                    }
                }
            }
        }
    }

    /// A matrix inside the messages that carry it (its length is the
    /// parent's, so a damaged one is read against the parent's buffer):
    /// the same bytes and verdicts as prost-derive's `ScoreRequest`.
    #[test]
    fn inside_a_score_request_it_encodes_and_decodes_as_prost_derive() {
        use crate::{reference::adserve::v1::ScoreRequest as DerivedRequest, v1::ScoreRequest};
        let mut runner = proptest::test_runner::TestRunner::default();
        let case =
            (matrix(), "[a-z0-9-]{0,20}", prop::collection::vec(any::<i64>(), 0..50), any::<usize>(), any::<u8>());
        runner
            .run(&case, |(m, id, ad_ids, at, byte)| {
                let ours = ScoreRequest {
                    matrix: Some(m.clone()),
                    request_id: id.clone(),
                    ad_ids: ad_ids.clone(),
                    whole_request: true,
                    ..Default::default()
                };
                let derived = DerivedRequest {
                    matrix: Some(to_derived(&m)),
                    request_id: id,
                    ad_ids,
                    whole_request: true,
                    ..Default::default()
                };
                let bytes = ours.encode_to_vec();
                prop_assert_eq!(&bytes, &derived.encode_to_vec());
                let mut damaged = [bytes[..at % (bytes.len() + 1)].to_vec(), bytes.clone()];
                let k = at % bytes.len();
                damaged[1][k] = byte;
                for input in damaged.iter().chain([&bytes]) {
                    match (ScoreRequest::decode(input.as_slice()), DerivedRequest::decode(input.as_slice())) {
                        (Ok(o), Ok(d)) => {
                            prop_assert_eq!(o.matrix.is_some(), d.matrix.is_some());
                            if let (Some(om), Some(dm)) = (&o.matrix, &d.matrix) {
                                prop_assert!(same(om, dm));
                            }
                            prop_assert_eq!((o.request_id, o.ad_ids), (d.request_id, d.ad_ids));
                        }
                        (Err(_), Err(_)) => {}
                        (o, d) => prop_assert!(false, "ours {:?}, prost-derive {:?}", o.is_ok(), d.is_ok()),
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    /// Every place one cut can fall in an encoding whose blocks have
    /// two-byte lengths (inside a length varint, inside a float, inside an
    /// id), and every pair of cuts in its first bytes.
    #[test]
    fn every_cut_decodes_as_the_whole() {
        let m = FeatureMatrix {
            feature_names: vec!["a".into(), "b".into()],
            num_rows: 20,
            values: (0..40).map(|i| i as f32 * 1.5 - 7.0).collect(),
            categorical_names: vec!["c".into()],
            categorical_ids: (0..20).map(|i| if i % 3 == 0 { -i } else { i * 1000 }).collect(),
            ..Default::default()
        };
        let bytes = m.encode_to_vec();
        for cut in 0..=bytes.len() {
            assert_eq!(FeatureMatrix::decode(chunked(&bytes, &[cut])).unwrap(), m, "cut at {cut}");
        }
        for a in 0..40 {
            for b in a..40 {
                assert_eq!(
                    FeatureMatrix::decode(chunked(&bytes, &[a, b, bytes.len() - b])).unwrap(),
                    m,
                    "cuts {a} {b}"
                );
            }
        }
    }

    /// Each float as a field of its own (proto2's default, legal in proto3
    /// and accepted by every parser) decodes like the packed block.
    #[test]
    fn unpacked_values_decode_and_blocks_of_one_field_concatenate() {
        use prost::encoding::{WireType, encode_key, float, int64};
        let mut bytes = Vec::new();
        for v in [1.5f32, -2.0] {
            encode_key(3, WireType::ThirtyTwoBit, &mut bytes);
            bytes.extend(v.to_le_bytes());
        }
        float::encode_packed(3, &[3.25, 4.0], &mut bytes);
        int64::encode_packed(5, &[7, -1], &mut bytes);
        int64::encode_repeated(5, &[300], &mut bytes);
        let m = FeatureMatrix::decode(bytes.as_slice()).unwrap();
        assert_eq!(m.values, [1.5, -2.0, 3.25, 4.0]);
        assert_eq!(m.categorical_ids, [7, -1, 300]);
        assert!(same(&m, &Derived::decode(bytes.as_slice()).unwrap()));
    }

    #[test]
    fn unknown_fields_are_skipped_as_prost_derive_skips_them() {
        use prost::encoding::{string, uint64};
        let m = FeatureMatrix { num_rows: 2, values: vec![0.5; 4], ..Default::default() };
        let mut bytes = m.encode_to_vec();
        uint64::encode(99, &7, &mut bytes);
        string::encode(1000, &"later".to_string(), &mut bytes);
        assert_eq!(FeatureMatrix::decode(bytes.as_slice()).unwrap(), m);
        assert!(same(&m, &Derived::decode(bytes.as_slice()).unwrap()));
    }

    #[test]
    fn a_decode_error_names_the_field() {
        // Field 3, length 5: not a whole number of floats.
        let bytes = [0x1a, 0x05, 0, 0, 0, 0, 0];
        let e = FeatureMatrix::decode(bytes.as_slice()).unwrap_err().to_string();
        assert!(e.contains("FeatureMatrix.values"), "{e}");
        assert!(Derived::decode(bytes.as_slice()).is_err());
    }

    #[test]
    fn clear_keeps_capacity() {
        let mut m = FeatureMatrix { values: vec![1.0; 64], ..Default::default() };
        m.clear();
        assert!(m.values.is_empty() && m.values.capacity() >= 64);
        assert_eq!(m, FeatureMatrix::default());
    }

    /// The field table matches the compiled proto: a field added there and
    /// not to this codec fails here.
    #[test]
    fn the_field_table_matches_the_descriptor() {
        use prost_types::{
            FileDescriptorSet,
            field_descriptor_proto::{Label, Type},
        };
        let fds = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let message = fds
            .file
            .iter()
            .filter(|f| f.package() == "adserve.v1")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "FeatureMatrix")
            .expect("adserve.v1.FeatureMatrix in the descriptor set");
        let described: Vec<(u32, String, String)> = message
            .field
            .iter()
            .map(|f| {
                let ty = match f.r#type() {
                    Type::String => "string",
                    Type::Uint32 => "uint32",
                    Type::Float => "float",
                    Type::Int64 => "int64",
                    other => panic!("field {} has type {other:?}, which this codec does not handle", f.name()),
                };
                let repeated = if f.label() == Label::Repeated { "repeated " } else { "" };
                (f.number() as u32, f.name().to_string(), format!("{repeated}{ty}"))
            })
            .collect();
        let known: Vec<(u32, String, String)> =
            super::FIELDS.iter().map(|(n, name, ty)| (*n, name.to_string(), ty.to_string())).collect();
        assert_eq!(described, known);
    }
}
