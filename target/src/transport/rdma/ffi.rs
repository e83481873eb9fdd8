//! The rdma-core calls the NVMe/RDMA transport makes, through a small C shim (`shim.c`,
//! compiled by `build.rs` against Debian's `libibverbs-dev` / `librdmacm-dev` headers).
//!
//! Why a shim rather than bindings of the verbs API: the calls on the data path
//! (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`, `ibv_req_notify_cq`) are `static inline`
//! in `<infiniband/verbs.h>` (they jump through the device context's ops table), so no library
//! exports them; and the structures they take (`ibv_send_wr` with its unions, `ibv_wc`,
//! `rdma_cm_event`, `rdma_conn_param`) would have to be mirrored field by field. The shim
//! includes the real headers, so no layout is repeated here: Rust sees opaque pointers and a
//! few plain structs defined by the shim itself ([`CmEvent`], [`WorkCompletion`]). About twenty
//! functions; the maintained crates (`rdma-sys`, `sideway`) bring bindgen or a much larger API
//! for the same calls. Every function returns 0 or a positive `errno`.

use std::ffi::{c_char, c_int, c_void};

/// `struct rdma_event_channel` (opaque).
#[repr(C)]
pub struct EventChannel {
    _p: [u8; 0],
}
/// `struct rdma_cm_id` (opaque).
#[repr(C)]
pub struct CmId {
    _p: [u8; 0],
}
/// The shim's `struct fb_qp`: protection domain, completion channel, CQ and QP of one queue.
#[repr(C)]
pub struct Qp {
    _p: [u8; 0],
}
/// `struct ibv_mr` (opaque).
#[repr(C)]
pub struct Mr {
    _p: [u8; 0],
}

/// The shim's `struct fb_event`: one RDMA CM event, copied out and already acknowledged.
#[repr(C)]
pub struct CmEvent {
    /// `enum rdma_cm_event_type` ([`event`]).
    pub event: u32,
    /// The event's status (an errno or a reject reason).
    pub status: i32,
    /// The id the event is about (for a connect request: the new connection's).
    pub id: *mut CmId,
    /// The listening id (connect requests).
    pub listen_id: *mut CmId,
    /// The private data of a connect request (NVMe/RDMA: [`super::wire::CmRequest`]), of the
    /// accept (ESTABLISHED, host side: CRQSIZE) or of a reject (REJECTED: RECFMT, STS).
    pub private_data: [u8; 64],
    /// Bytes of `private_data` used.
    pub private_data_len: u8,
    /// The initiator's responder resources (RDMA READs it accepts from us at once).
    pub responder_resources: u8,
    /// The initiator's initiator depth.
    pub initiator_depth: u8,
}

/// `enum rdma_cm_event_type` values the transport handles.
pub mod event {
    /// The host's address resolution finished.
    pub const ADDR_RESOLVED: u32 = 0;
    /// The host's route resolution finished.
    pub const ROUTE_RESOLVED: u32 = 2;
    /// A host asks to connect.
    pub const CONNECT_REQUEST: u32 = 4;
    /// The connection failed before it was established.
    pub const CONNECT_ERROR: u32 = 6;
    /// The peer is unreachable.
    pub const UNREACHABLE: u32 = 7;
    /// The peer rejected the connection.
    pub const REJECTED: u32 = 8;
    /// The connection is established.
    pub const ESTABLISHED: u32 = 9;
    /// The peer disconnected.
    pub const DISCONNECTED: u32 = 10;
    /// The RDMA device went away.
    pub const DEVICE_REMOVAL: u32 = 11;
    /// The connection left its time-wait state.
    pub const TIMEWAIT_EXIT: u32 = 15;
}

/// The shim's `struct fb_wc`: the fields of an `ibv_wc` the transport reads.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct WorkCompletion {
    /// The work request's id.
    pub wr_id: u64,
    /// `enum ibv_wc_status` (0: success).
    pub status: u32,
    /// `enum ibv_wc_opcode`.
    pub opcode: u32,
    /// Bytes received (receives).
    pub byte_len: u32,
}

unsafe extern "C" {
    pub fn fb_channel_create(ch: *mut *mut EventChannel, fd: *mut c_int) -> c_int;
    pub fn fb_channel_destroy(ch: *mut EventChannel);
    pub fn fb_listen(
        ch: *mut EventChannel,
        addr: *const c_char,
        port: *const c_char,
        backlog: c_int,
        id: *mut *mut CmId,
        bound_port: *mut u16,
    ) -> c_int;
    pub fn fb_get_event(ch: *mut EventChannel, out: *mut CmEvent) -> c_int;
    pub fn fb_create_id(ch: *mut EventChannel, id: *mut *mut CmId) -> c_int;
    pub fn fb_resolve_addr(
        id: *mut CmId,
        addr: *const c_char,
        port: *const c_char,
        timeout_ms: c_int,
    ) -> c_int;
    pub fn fb_resolve_route(id: *mut CmId, timeout_ms: c_int) -> c_int;
    pub fn fb_connect(
        q: *mut Qp,
        pd: *const c_void,
        len: u8,
        responder_resources: u8,
        initiator_depth: u8,
    ) -> c_int;
    pub fn fb_reg_mr_remote(q: *mut Qp, addr: *mut c_void, len: usize) -> *mut Mr;
    pub fn fb_mr_rkey(mr: *const Mr) -> u32;
    pub fn fb_post_send(q: *mut Qp, wr_id: u64, addr: *mut c_void, len: u32, lkey: u32) -> c_int;
    pub fn fb_migrate(id: *mut CmId, ch: *mut EventChannel) -> c_int;
    pub fn fb_reject(id: *mut CmId, pd: *const c_void, len: u8) -> c_int;
    pub fn fb_destroy_id(id: *mut CmId);
    pub fn fb_disconnect(id: *mut CmId) -> c_int;
    pub fn fb_qp_create(
        id: *mut CmId,
        send_wr: u32,
        recv_wr: u32,
        max_inline: u32,
        out: *mut *mut Qp,
        cc_fd: *mut c_int,
    ) -> c_int;
    pub fn fb_qp_destroy_qp(q: *mut Qp);
    pub fn fb_qp_free(q: *mut Qp);
    pub fn fb_peer(id: *mut CmId, buf: *mut c_char, len: usize);
    pub fn fb_reg_mr(q: *mut Qp, addr: *mut c_void, len: usize) -> *mut Mr;
    pub fn fb_mr_lkey(mr: *const Mr) -> u32;
    pub fn fb_dereg_mr(mr: *mut Mr);
    pub fn fb_accept(
        q: *mut Qp,
        pd: *const c_void,
        len: u8,
        responder_resources: u8,
        initiator_depth: u8,
    ) -> c_int;
    pub fn fb_post_recv(q: *mut Qp, wr_id: u64, addr: *mut c_void, len: u32, lkey: u32) -> c_int;
    pub fn fb_post_send_inline(q: *mut Qp, wr_id: u64, data: *const c_void, len: u32) -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn fb_post_rdma(
        q: *mut Qp,
        wr_id: u64,
        write: c_int,
        addr: *mut c_void,
        len: u32,
        lkey: u32,
        raddr: u64,
        rkey: u32,
    ) -> c_int;
    pub fn fb_poll_cq(q: *mut Qp, n: c_int, out: *mut WorkCompletion) -> c_int;
    pub fn fb_cq_events(q: *mut Qp) -> c_int;
    pub fn fb_req_notify(q: *mut Qp) -> c_int;
    pub fn fb_wc_status_str(s: u32) -> *const c_char;
    pub fn fb_event_str(e: u32) -> *const c_char;
}

/// `ibv_wc_status_str` as a Rust string.
pub fn wc_status(s: u32) -> String {
    // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any value.
    unsafe { std::ffi::CStr::from_ptr(fb_wc_status_str(s)) }
        .to_string_lossy()
        .into_owned()
}

/// The peer address of `id` as `ip:port`.
///
/// # Safety
/// `id` is a live CM id.
pub unsafe fn peer(id: *mut CmId) -> String {
    let mut b = [0 as c_char; 96];
    // SAFETY: the caller passes a live id; fb_peer writes a NUL-terminated string of at most
    // `b.len()` bytes.
    unsafe { fb_peer(id, b.as_mut_ptr(), b.len()) };
    // SAFETY: NUL-terminated by fb_peer (b[0] = 0 at least).
    unsafe { std::ffi::CStr::from_ptr(b.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// `rdma_event_str` as a Rust string.
pub fn event_name(e: u32) -> String {
    // SAFETY: rdma_event_str returns a static NUL-terminated string for any value.
    unsafe { std::ffi::CStr::from_ptr(fb_event_str(e)) }
        .to_string_lossy()
        .into_owned()
}
