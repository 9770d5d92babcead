/*
 * TEST DOUBLE of rdma-core's libibverbs.so.1 (user-space verbs library), written for pdkv.
 *
 * Why: the released InfiniStore server (infinistore 0.2.35) opens an RDMA device, allocates a
 * protection domain and registers its memory pool with ibv_reg_mr before it serves anything,
 * TCP included; there is no RDMA device on pdkv's dev and CI machines. Loaded in place of the
 * real library (LD_LIBRARY_PATH=<dir holding this libibverbs.so.1>, server process only), it
 * lists one device, "pdkv_double0", with one active InfiniBand port, so the real server starts,
 * and then serves its real TCP path (tcp_write_cache / tcp_read_cache / exists / delete) from
 * its real memory pool.
 *
 * What it does NOT do: move a single byte. Every call that would set up an RDMA data path
 * (completion channel, CQ, QP, CQ events) fails with EOPNOTSUPP, so an RDMA client is refused
 * ("Failed to setup RDMA connection"), never served by something that only looks like RDMA.
 * ibv_reg_mr records the range and hands out keys; it pins nothing.
 *
 * Structure layouts come from the real <infiniband/verbs.h> (libibverbs-dev). The exported
 * symbols carry rdma-core's version nodes (IBVERBS_1.0 / IBVERBS_1.1, see libibverbs_double.map)
 * because the InfiniStore module links them versioned.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <infiniband/verbs.h>

/* verbs.h wraps these two in inline helpers/macros; the library exports the plain calls. */
#undef ibv_query_port
#undef ibv_reg_mr

#define DOUBLE_NAME "pdkv_double0"

static struct ibv_device double_device;
static int device_ready;
static uint32_t next_key = 1;

static void unsupported(const char *what) {
    fprintf(stderr, "libibverbs test double (pdkv): %s is not supported: no RDMA device here, "
                    "only InfiniStore's TCP path can be served\n", what);
    errno = EOPNOTSUPP;
}

static void init_device(void) {
    if (device_ready)
        return;
    memset(&double_device, 0, sizeof(double_device));
    double_device.node_type = IBV_NODE_CA;
    double_device.transport_type = IBV_TRANSPORT_IB;
    snprintf(double_device.name, sizeof(double_device.name), "%s", DOUBLE_NAME);
    snprintf(double_device.dev_name, sizeof(double_device.dev_name), "uverbs-double0");
    snprintf(double_device.dev_path, sizeof(double_device.dev_path), "/nonexistent/uverbs-double0");
    snprintf(double_device.ibdev_path, sizeof(double_device.ibdev_path), "/nonexistent/%s", DOUBLE_NAME);
    device_ready = 1;
}

struct ibv_device **ibv_get_device_list(int *num_devices) {
    struct ibv_device **list = calloc(2, sizeof(*list));
    if (!list) {
        errno = ENOMEM;
        return NULL;
    }
    init_device();
    list[0] = &double_device;
    if (num_devices)
        *num_devices = 1;
    return list;
}

void ibv_free_device_list(struct ibv_device **list) { free(list); }

const char *ibv_get_device_name(struct ibv_device *device) { return device ? device->name : NULL; }

struct ibv_context *ibv_open_device(struct ibv_device *device) {
    struct ibv_context *ctx;
    if (device != &double_device) {
        errno = ENODEV;
        return NULL;
    }
    ctx = calloc(1, sizeof(*ctx));  /* abi_compat NULL: verbs.h's inline helpers use the exported calls */
    if (!ctx) {
        errno = ENOMEM;
        return NULL;
    }
    ctx->device = device;
    ctx->cmd_fd = -1;
    ctx->async_fd = -1;
    ctx->num_comp_vectors = 1;
    return ctx;
}

int ibv_close_device(struct ibv_context *context) {
    free(context);
    return 0;
}

/* Exported as rdma-core does: the caller's struct may be the older, shorter one, so only the
 * fields up to link_layer (common to both) are written. */
int ibv_query_port(struct ibv_context *context, uint8_t port_num, struct _compat_ibv_port_attr *compat) {
    struct ibv_port_attr *attr = (struct ibv_port_attr *)compat;
    if (!context || !attr || port_num != 1)
        return EINVAL;
    memset(attr, 0, offsetof(struct ibv_port_attr, link_layer) + 1);
    attr->state = IBV_PORT_ACTIVE;
    attr->max_mtu = IBV_MTU_4096;
    attr->active_mtu = IBV_MTU_4096;
    attr->gid_tbl_len = 1;
    attr->max_msg_sz = 1u << 31;
    attr->pkey_tbl_len = 1;
    attr->lid = 1;
    attr->phys_state = 5; /* LinkUp */
    attr->link_layer = IBV_LINK_LAYER_INFINIBAND;
    return 0;
}

int ibv_query_gid(struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid) {
    if (!context || !gid || port_num != 1 || index != 0)
        return EINVAL;
    memset(gid, 0, sizeof(*gid));
    gid->raw[0] = 0xfe;
    gid->raw[1] = 0x80;
    return 0;
}

struct ibv_pd *ibv_alloc_pd(struct ibv_context *context) {
    struct ibv_pd *pd = calloc(1, sizeof(*pd));
    if (!pd) {
        errno = ENOMEM;
        return NULL;
    }
    pd->context = context;
    pd->handle = next_key++;
    return pd;
}

int ibv_dealloc_pd(struct ibv_pd *pd) {
    free(pd);
    return 0;
}

struct ibv_mr *ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length, int access) {
    struct ibv_mr *mr;
    (void)access;
    if (!pd || !addr || !length) {
        errno = EINVAL;
        return NULL;
    }
    mr = calloc(1, sizeof(*mr));
    if (!mr) {
        errno = ENOMEM;
        return NULL;
    }
    mr->context = pd->context;
    mr->pd = pd;
    mr->addr = addr;
    mr->length = length;
    mr->handle = next_key;
    mr->lkey = next_key;
    mr->rkey = next_key++;
    return mr;
}

int ibv_dereg_mr(struct ibv_mr *mr) {
    free(mr);
    return 0;
}

struct ibv_comp_channel *ibv_create_comp_channel(struct ibv_context *context) {
    (void)context;
    unsupported("ibv_create_comp_channel");
    return NULL;
}

int ibv_destroy_comp_channel(struct ibv_comp_channel *channel) {
    (void)channel;
    return EINVAL;
}

struct ibv_cq *ibv_create_cq(struct ibv_context *context, int cqe, void *cq_context,
                             struct ibv_comp_channel *channel, int comp_vector) {
    (void)context; (void)cqe; (void)cq_context; (void)channel; (void)comp_vector;
    unsupported("ibv_create_cq");
    return NULL;
}

int ibv_destroy_cq(struct ibv_cq *cq) {
    (void)cq;
    return EINVAL;
}

struct ibv_qp *ibv_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr) {
    (void)pd; (void)attr;
    unsupported("ibv_create_qp");
    return NULL;
}

int ibv_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask) {
    (void)qp; (void)attr; (void)attr_mask;
    unsupported("ibv_modify_qp");
    return EOPNOTSUPP;
}

int ibv_destroy_qp(struct ibv_qp *qp) {
    (void)qp;
    return EINVAL;
}

int ibv_get_cq_event(struct ibv_comp_channel *channel, struct ibv_cq **cq, void **cq_context) {
    (void)channel; (void)cq; (void)cq_context;
    unsupported("ibv_get_cq_event");
    return -1;
}

void ibv_ack_cq_events(struct ibv_cq *cq, unsigned int nevents) { (void)cq; (void)nevents; }

const char *ibv_wc_status_str(enum ibv_wc_status status) {
    return status == IBV_WC_SUCCESS ? "success" : "error (libibverbs test double: no RDMA)";
}
