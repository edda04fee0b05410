//! PyTorch Distributed Checkpoint (DCP) directories — being built; not yet a format pmad
//! opens (checkpoints in DCP are still refused with a message, see `docs/formats.md`).
//!
//! A DCP checkpoint is a directory of `__<rank>_<n>.distcp` data files and a `.metadata`
//! pickle written last. With torch's default serialization every item in a `.distcp` file —
//! a tensor chunk, or a non-tensor object — is a complete `torch.save` zip archive of its own,
//! stored (not compressed), at the `(file, offset, length)` that `.metadata` gives for it.
//!
//! What is here so far:
//! - [`archive`]: the zip archive of one item — its entries and where their stored bytes
//!   are — and the CRC32 patch a writer needs after replacing an entry's bytes.
//! - [`pickle`]: a pickle reader that never executes anything, for `.metadata` and each
//!   item's `data.pkl`: a stack machine whose only output is a tree of values, classes kept
//!   as names.
//!
//! Still to come, in this order: decoding torch's `Metadata` and `_rebuild_tensor_v2` from
//! those values (classes matched by name and fields), the opener that turns a DCP directory
//! into a [`Checkpoint`](super::Checkpoint) (one catalog entry per tensor chunk), and the
//! writer. The test fixtures, written by real torch, are in `tests/fixtures/dcp/`.

pub mod archive;
pub mod pickle;
