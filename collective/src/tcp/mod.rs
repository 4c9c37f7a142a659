//! The TCP backend: one persistent connection between every pair of ranks, set up once after
//! rendezvous, and ring algorithms driven by a single-threaded poll loop per operation.
//!
//! The loop writes to the successor and reads from the predecessor whenever either is ready, so
//! sending, receiving and reducing overlap, no call can deadlock on full socket buffers, and a
//! chunk is forwarded as soon as it has been reduced. Data goes straight between the caller's
//! buffer and the socket (reductions use one reusable scratch chunk): no per-call allocation of
//! big buffers. Every operation starts with a header naming the operation, the group and a
//! sequence number, so ranks that disagree about what they are doing fail loudly instead of
//! mixing data; the connection handshake names the job and attempt and proves knowledge of the
//! attempt's secret, so neither a rank of an earlier attempt nor a process without the secret
//! can join.

mod comm;
mod connect;
mod frame;
mod group;
mod poll;
mod ring;
mod small;

pub use comm::{AbortHandle, TcpComm};
pub use connect::{Identity, OPENING, admit};
pub use frame::check_header;
pub use group::Group;

#[cfg(target_endian = "big")]
compile_error!("the TCP collectives send f32 in native byte order and assume little-endian hosts");
