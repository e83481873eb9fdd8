/* The verbs and RDMA CM calls the NVMe/RDMA transport makes (see ffi.rs for why a C shim).
 * Every function returns 0 or a positive errno; objects stay opaque to Rust. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <netdb.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

static int err(void) { return errno ? errno : EIO; }

static int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return err();
    return 0;
}

struct fb_event {
    uint32_t event;
    int32_t status;
    struct rdma_cm_id *id;
    struct rdma_cm_id *listen_id;
    uint8_t private_data[64];
    uint8_t private_data_len;
    uint8_t responder_resources;
    uint8_t initiator_depth;
};

int fb_channel_create(struct rdma_event_channel **ch, int *fd) {
    *ch = rdma_create_event_channel();
    if (!*ch)
        return err();
    *fd = (*ch)->fd;
    int r = set_nonblock(*fd);
    if (r) {
        rdma_destroy_event_channel(*ch);
        *ch = NULL;
    }
    return r;
}

void fb_channel_destroy(struct rdma_event_channel *ch) { rdma_destroy_event_channel(ch); }

int fb_listen(struct rdma_event_channel *ch, const char *addr, const char *port, int backlog,
              struct rdma_cm_id **id, uint16_t *bound_port) {
    struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE,
                             .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    if (getaddrinfo(addr, port, &hints, &ai) != 0 || !ai)
        return EINVAL;
    int r = 0;
    if (rdma_create_id(ch, id, NULL, RDMA_PS_TCP)) {
        r = err();
        freeaddrinfo(ai);
        return r;
    }
    if (rdma_bind_addr(*id, ai->ai_addr) || rdma_listen(*id, backlog)) {
        r = err();
        rdma_destroy_id(*id);
        *id = NULL;
    } else {
        *bound_port = ntohs(rdma_get_src_port(*id));
    }
    freeaddrinfo(ai);
    return r;
}

/* Takes one event without blocking (EAGAIN: none), copies what the caller needs and acks it. */
int fb_get_event(struct rdma_event_channel *ch, struct fb_event *out) {
    struct rdma_cm_event *ev;
    if (rdma_get_cm_event(ch, &ev))
        return err();
    memset(out, 0, sizeof(*out));
    out->event = ev->event;
    out->status = ev->status;
    out->id = ev->id;
    out->listen_id = ev->listen_id;
    if (ev->event == RDMA_CM_EVENT_CONNECT_REQUEST || ev->event == RDMA_CM_EVENT_ESTABLISHED ||
        ev->event == RDMA_CM_EVENT_REJECTED) {
        uint8_t n = ev->param.conn.private_data_len;
        if (n > sizeof(out->private_data))
            n = sizeof(out->private_data);
        if (ev->param.conn.private_data)
            memcpy(out->private_data, ev->param.conn.private_data, n);
        out->private_data_len = n;
        out->responder_resources = ev->param.conn.responder_resources;
        out->initiator_depth = ev->param.conn.initiator_depth;
    }
    rdma_ack_cm_event(ev);
    return 0;
}

/* Host side: a new id on `ch` (RC, the TCP port space as NVMe/RDMA uses). */
int fb_create_id(struct rdma_event_channel *ch, struct rdma_cm_id **id) {
    return rdma_create_id(ch, id, NULL, RDMA_PS_TCP) ? err() : 0;
}

/* Host side: starts resolving the numeric address `addr`:`port` (ADDR_RESOLVED or ADDR_ERROR
 * follows on the id's channel). */
int fb_resolve_addr(struct rdma_cm_id *id, const char *addr, const char *port, int timeout_ms) {
    struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV,
                             .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    if (getaddrinfo(addr, port, &hints, &ai) != 0 || !ai)
        return EINVAL;
    int r = rdma_resolve_addr(id, NULL, ai->ai_addr, timeout_ms) ? err() : 0;
    freeaddrinfo(ai);
    return r;
}

/* Host side: starts resolving the route (ROUTE_RESOLVED or ROUTE_ERROR follows). */
int fb_resolve_route(struct rdma_cm_id *id, int timeout_ms) {
    return rdma_resolve_route(id, timeout_ms) ? err() : 0;
}

int fb_migrate(struct rdma_cm_id *id, struct rdma_event_channel *ch) {
    return rdma_migrate_id(id, ch) ? err() : 0;
}

int fb_reject(struct rdma_cm_id *id, const void *pd, uint8_t len) {
    return rdma_reject(id, pd, len) ? err() : 0;
}

void fb_destroy_id(struct rdma_cm_id *id) { rdma_destroy_id(id); }

/* The peer's address as "ip:port" into buf (empty if unknown). */
void fb_peer(struct rdma_cm_id *id, char *buf, size_t len) {
    char host[64] = "", serv[16] = "";
    struct sockaddr *sa = rdma_get_peer_addr(id);
    buf[0] = 0;
    if (!sa || getnameinfo(sa, sizeof(struct sockaddr_storage), host, sizeof(host), serv,
                           sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV))
        return;
    snprintf(buf, len, sa->sa_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, serv);
}

int fb_disconnect(struct rdma_cm_id *id) { return rdma_disconnect(id) ? err() : 0; }

/* The verbs objects of one queue pair. */
struct fb_qp {
    struct rdma_cm_id *id;
    struct ibv_pd *pd;
    struct ibv_comp_channel *cc;
    struct ibv_cq *cq;
    struct ibv_qp *qp;
};

int fb_qp_create(struct rdma_cm_id *id, uint32_t send_wr, uint32_t recv_wr,
                 uint32_t max_inline, struct fb_qp **out, int *cc_fd) {
    struct fb_qp *q = calloc(1, sizeof(*q));
    if (!q)
        return ENOMEM;
    q->id = id;
    int r = 0;
    q->pd = ibv_alloc_pd(id->verbs);
    if (!q->pd) goto fail;
    q->cc = ibv_create_comp_channel(id->verbs);
    if (!q->cc) goto fail;
    if ((r = set_nonblock(q->cc->fd))) goto fail_r;
    q->cq = ibv_create_cq(id->verbs, (int)(send_wr + recv_wr), NULL, q->cc, 0);
    if (!q->cq) goto fail;
    if (ibv_req_notify_cq(q->cq, 0)) goto fail;
    struct ibv_qp_init_attr a = {
        .send_cq = q->cq,
        .recv_cq = q->cq,
        .qp_type = IBV_QPT_RC,
        .cap = {.max_send_wr = send_wr, .max_recv_wr = recv_wr, .max_send_sge = 1,
                .max_recv_sge = 1, .max_inline_data = max_inline},
        .sq_sig_all = 1,
    };
    if (rdma_create_qp(id, q->pd, &a)) goto fail;
    q->qp = id->qp;
    *out = q;
    *cc_fd = q->cc->fd;
    return 0;
fail:
    r = err();
fail_r:
    if (q->cq) ibv_destroy_cq(q->cq);
    if (q->cc) ibv_destroy_comp_channel(q->cc);
    if (q->pd) ibv_dealloc_pd(q->pd);
    free(q);
    return r;
}

/* Destroys the queue pair (first: no work request uses a memory region after this). */
void fb_qp_destroy_qp(struct fb_qp *q) {
    if (q->qp) rdma_destroy_qp(q->id);
    q->qp = NULL;
}

/* Frees the rest once the memory regions are deregistered (the CM id stays with the caller). */
void fb_qp_free(struct fb_qp *q) {
    fb_qp_destroy_qp(q);
    ibv_destroy_cq(q->cq);
    ibv_destroy_comp_channel(q->cc);
    ibv_dealloc_pd(q->pd);
    free(q);
}

/* Local access only: the host never reaches our memory, we READ and WRITE its. */
struct ibv_mr *fb_reg_mr(struct fb_qp *q, void *addr, size_t len) {
    return ibv_reg_mr(q->pd, addr, len, IBV_ACCESS_LOCAL_WRITE);
}

/* Host side: memory the target reads (host writes) and writes (host reads) by RDMA. */
struct ibv_mr *fb_reg_mr_remote(struct fb_qp *q, void *addr, size_t len) {
    return ibv_reg_mr(q->pd, addr, len,
                      IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE);
}

uint32_t fb_mr_rkey(const struct ibv_mr *mr) { return mr->rkey; }

uint32_t fb_mr_lkey(const struct ibv_mr *mr) { return mr->lkey; }

void fb_dereg_mr(struct ibv_mr *mr) { ibv_dereg_mr(mr); }

/* The connection parameters of both sides: private data, RDMA READ depths, retries without
 * limit on receiver-not-ready (a receive buffer is always posted again soon). */
static struct rdma_conn_param conn_param(const void *pd, uint8_t len,
                                         uint8_t responder_resources, uint8_t initiator_depth) {
    struct rdma_conn_param p = {
        .private_data = pd,
        .private_data_len = len,
        .responder_resources = responder_resources,
        .initiator_depth = initiator_depth,
        .flow_control = 1,
        .retry_count = 7,
        .rnr_retry_count = 7,
    };
    return p;
}

int fb_accept(struct fb_qp *q, const void *pd, uint8_t len, uint8_t responder_resources,
              uint8_t initiator_depth) {
    struct rdma_conn_param p = conn_param(pd, len, responder_resources, initiator_depth);
    return rdma_accept(q->id, &p) ? err() : 0;
}

/* Host side: connects with the NVMe/RDMA private data; ESTABLISHED or REJECTED follows. */
int fb_connect(struct fb_qp *q, const void *pd, uint8_t len, uint8_t responder_resources,
               uint8_t initiator_depth) {
    /* No more RDMA READ depth than the device has. */
    struct ibv_device_attr a;
    if (ibv_query_device(q->id->verbs, &a) == 0) {
        if (a.max_qp_rd_atom >= 0 && responder_resources > a.max_qp_rd_atom)
            responder_resources = (uint8_t)a.max_qp_rd_atom;
        if (a.max_qp_init_rd_atom >= 0 && initiator_depth > a.max_qp_init_rd_atom)
            initiator_depth = (uint8_t)a.max_qp_init_rd_atom;
    }
    struct rdma_conn_param p = conn_param(pd, len, responder_resources, initiator_depth);
    return rdma_connect(q->id, &p) ? err() : 0;
}

int fb_post_recv(struct fb_qp *q, uint64_t wr_id, void *addr, uint32_t len, uint32_t lkey) {
    struct ibv_sge sge = {.addr = (uintptr_t)addr, .length = len, .lkey = lkey};
    struct ibv_recv_wr wr = {.wr_id = wr_id, .sg_list = &sge, .num_sge = 1}, *bad;
    return ibv_post_recv(q->qp, &wr, &bad);
}

/* A SEND of `len` bytes copied into the work request (inline: no registered memory). */
int fb_post_send_inline(struct fb_qp *q, uint64_t wr_id, const void *data, uint32_t len) {
    struct ibv_sge sge = {.addr = (uintptr_t)data, .length = len, .lkey = 0};
    struct ibv_send_wr wr = {.wr_id = wr_id, .sg_list = &sge, .num_sge = 1,
                             .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_INLINE | IBV_SEND_SIGNALED},
                       *bad;
    return ibv_post_send(q->qp, &wr, &bad);
}

/* A SEND of `len` bytes from registered memory. */
int fb_post_send(struct fb_qp *q, uint64_t wr_id, void *addr, uint32_t len, uint32_t lkey) {
    struct ibv_sge sge = {.addr = (uintptr_t)addr, .length = len, .lkey = lkey};
    struct ibv_send_wr wr = {.wr_id = wr_id, .sg_list = &sge, .num_sge = 1,
                             .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED},
                       *bad;
    return ibv_post_send(q->qp, &wr, &bad);
}

/* An RDMA READ (write = 0) or RDMA WRITE (write = 1) between local and remote memory. */
int fb_post_rdma(struct fb_qp *q, uint64_t wr_id, int write, void *addr, uint32_t len,
                 uint32_t lkey, uint64_t raddr, uint32_t rkey) {
    struct ibv_sge sge = {.addr = (uintptr_t)addr, .length = len, .lkey = lkey};
    struct ibv_send_wr wr = {.wr_id = wr_id, .sg_list = &sge, .num_sge = 1,
                             .opcode = write ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ,
                             .send_flags = IBV_SEND_SIGNALED},
                       *bad;
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    return ibv_post_send(q->qp, &wr, &bad);
}

struct fb_wc {
    uint64_t wr_id;
    uint32_t status;
    uint32_t opcode;
    uint32_t byte_len;
};

/* Polls up to n completions; returns how many (negative: error). */
int fb_poll_cq(struct fb_qp *q, int n, struct fb_wc *out) {
    struct ibv_wc wc[16];
    if (n > 16) n = 16;
    int got = ibv_poll_cq(q->cq, n, wc);
    for (int i = 0; i < got; i++) {
        out[i].wr_id = wc[i].wr_id;
        out[i].status = wc[i].status;
        out[i].opcode = wc[i].opcode;
        out[i].byte_len = wc[i].byte_len;
    }
    return got;
}

/* Takes and acks every pending completion-channel event (non-blocking), then re-arms. */
int fb_cq_events(struct fb_qp *q) {
    struct ibv_cq *cq;
    void *ctx;
    int n = 0;
    while (ibv_get_cq_event(q->cc, &cq, &ctx) == 0) {
        ibv_ack_cq_events(cq, 1);
        n++;
    }
    return n;
}

int fb_req_notify(struct fb_qp *q) { return ibv_req_notify_cq(q->cq, 0); }

const char *fb_wc_status_str(uint32_t s) { return ibv_wc_status_str((enum ibv_wc_status)s); }
const char *fb_event_str(uint32_t e) { return rdma_event_str((enum rdma_cm_event_type)e); }
