/*
 * The fio side of the ferroblk engine: the `struct ioengine_ops` fio loads and the option
 * table, compiled against the installed fio's own headers (fio/fetch-headers.sh). Each callback
 * reads what it needs from fio's structures and calls the Rust side (fio/src/lib.rs) with plain
 * values; nothing here keeps state or decides anything.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "fio.h"
#include "optgroup.h"

/* The ops layout and semantics this file was written against; a fio with other headers must
 * not compile it (the build names fio/fetch-headers.sh). */
_Static_assert(FIO_IOOPS_VERSION == 31,
	       "ferroblk fio engine: written for FIO_IOOPS_VERSION 31 (fio 3.33)");

#ifndef FERROBLK_FIO_VERSION
#error "FERROBLK_FIO_VERSION (the fio version of the headers) is set by build.rs"
#endif

/* The Rust side (fio/src/lib.rs). `err` buffers receive a message on failure. */
struct ffio_opts {
	const char *mode;
	const char *config;
};

struct ffio_limits {
	unsigned long long min_bs[3];
	unsigned long long max_bs[3];
	unsigned long long ba[3];
};

extern int ffio_probe(const struct ffio_opts *o, const char *file_name, int use_thread,
		      const struct ffio_limits *limits, unsigned long long *size,
		      char *err, size_t errlen);
extern void *ffio_open(const struct ffio_opts *o, unsigned int iodepth, unsigned int nr_files,
		       const char *const *names, char *err, size_t errlen);
extern int ffio_queue(void *e, unsigned int file, int ddir, unsigned long long offset,
		      void *buf, unsigned long long len, void *io_u);
extern int ffio_getevents(void *e, unsigned int min, unsigned int max, long long timeout_ns,
			  char *err, size_t errlen);
extern void *ffio_event(void *e, int i, int *error);
extern void *ffio_iomem_alloc(void *e, size_t len, char *err, size_t errlen);
extern void ffio_iomem_free(void *e);
extern void ffio_close(void *e);

/* What ffio_queue answers. */
enum { FFIO_QUEUED = 0, FFIO_BUSY = 1, FFIO_FAILED = 2 };
/* ffio_queue's operations (fio's ddir values are not part of the Rust side). */
enum { FFIO_READ = 0, FFIO_WRITE = 1, FFIO_TRIM = 2, FFIO_FLUSH = 3 };

#define ERRLEN 512

struct ferroblk_options {
	void *pad; /* fio's parser needs no option at offset 0 */
	char *mode;
	char *config;
};

static struct fio_option options[] = {
	{
		.name = "ferroblk_mode",
		.lname = "ferroblk mode",
		.type = FIO_OPT_STR_STORE,
		.off1 = offsetof(struct ferroblk_options, mode),
		.help = "How to reach the volume: bdev (an in-process bdev chain), nvmf (NVMe/TCP "
			"through ferroblk's initiator) or vhost (vhost-user-blk through libblkio)",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = "ferroblk_config",
		.lname = "ferroblk config",
		.type = FIO_OPT_STR_STORE,
		.off1 = offsetof(struct ferroblk_options, config),
		.help = "bdev mode: the ferroblk configuration file whose [[bdev]] tables to build "
			"(filename= names the bdev)",
		.category = FIO_OPT_C_ENGINE,
		.group = FIO_OPT_G_INVALID,
	},
	{
		.name = NULL,
	},
};

/* The version of the fio that loaded us, compared with the headers' at load and at each
 * entry point that can fail: a fio whose structures differ must not be driven. */
static const char *running_version;
static int version_ok;

static void ffio_check_version(void)
{
	const char *v = dlsym(RTLD_DEFAULT, "fio_version_string");

	running_version = v ? v : "(unknown: fio_version_string not exported)";
	version_ok = v && strcmp(v, FERROBLK_FIO_VERSION) == 0;
}

static int ffio_version_error(struct thread_data *td)
{
	if (version_ok)
		return 0;
	/* Only fio's log functions, never its structures: their layout is what differs. */
	fprintf(stderr,
		"ferroblk fio engine: built against %s (ioengine ops version %d) but loaded by %s; "
		"rebuild it against this fio (fio/fetch-headers.sh, then cargo build -p ferroblk-fio)\n",
		FERROBLK_FIO_VERSION, FIO_IOOPS_VERSION, running_version);
	(void)td;
	return 1;
}

static struct ferroblk_options *engine_options(struct thread_data *td)
{
	return td->eo;
}

static void get_opts(struct thread_data *td, struct ffio_opts *o)
{
	struct ferroblk_options *eo = engine_options(td);

	o->mode = eo ? eo->mode : NULL;
	o->config = eo ? eo->config : NULL;
}

/* fio's log_err (which also reaches a fio client in client/server mode), looked up at run
 * time so that the Rust test harness, which links this file without fio, links. */
typedef ssize_t (*log_err_fn)(const char *fmt, ...);

static void fail(struct thread_data *td, int err, const char *what, const char *msg)
{
	log_err_fn log = (log_err_fn)dlsym(RTLD_DEFAULT, "log_err");

	if (log)
		log("ferroblk: %s\n", msg);
	else
		fprintf(stderr, "ferroblk: %s\n", msg);
	td_verror(td, err, what);
}

static int ffio_get_file_size(struct thread_data *td, struct fio_file *f)
{
	struct ffio_opts o;
	struct ffio_limits l;
	unsigned long long size = 0;
	char err[ERRLEN] = "";
	int i;

	if (ffio_version_error(td))
		return 1;
	get_opts(td, &o);
	for (i = 0; i < 3; i++) {
		l.min_bs[i] = td->o.min_bs[i];
		l.max_bs[i] = td->o.max_bs[i];
		l.ba[i] = td->o.ba[i];
	}
	if (ffio_probe(&o, f->file_name, td->o.use_thread, &l, &size, err, sizeof(err))) {
		fail(td, EINVAL, "ferroblk get_file_size", err);
		return 1;
	}
	f->real_file_size = size;
	fio_file_set_size_known(f);
	return 0;
}

static int ffio_init(struct thread_data *td)
{
	struct ffio_opts o;
	const char *names[td->o.nr_files ? td->o.nr_files : 1];
	struct fio_file *f;
	unsigned int i, n = 0;
	char err[ERRLEN] = "";
	void *e;

	if (ffio_version_error(td))
		return 1;
	get_opts(td, &o);
	/* Index i is the file's fileno, which queue() passes back. */
	for_each_file(td, f, i)
		names[n++] = f->file_name;
	e = ffio_open(&o, td->o.iodepth, n, names, err, sizeof(err));
	if (!e) {
		fail(td, EINVAL, "ferroblk init", err);
		return 1;
	}
	td->io_ops_data = e;
	return 0;
}

static void ffio_cleanup(struct thread_data *td)
{
	if (td->io_ops_data) {
		ffio_close(td->io_ops_data);
		td->io_ops_data = NULL;
	}
}

static enum fio_q_status ffio_queue_io(struct thread_data *td, struct io_u *io_u)
{
	int op, r;

	fio_ro_check(td, io_u);
	switch (io_u->ddir) {
	case DDIR_READ:
		op = FFIO_READ;
		break;
	case DDIR_WRITE:
		op = FFIO_WRITE;
		break;
	case DDIR_TRIM:
		op = FFIO_TRIM;
		break;
	case DDIR_SYNC:
	case DDIR_DATASYNC:
		op = FFIO_FLUSH;
		break;
	default:
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	r = ffio_queue(td->io_ops_data, (unsigned int)io_u->file->fileno, op, io_u->offset,
		       io_u->xfer_buf, io_u->xfer_buflen, io_u);
	if (r == FFIO_BUSY)
		return FIO_Q_BUSY;
	if (r == FFIO_FAILED) {
		io_u->error = EINVAL;
		return FIO_Q_COMPLETED;
	}
	return FIO_Q_QUEUED;
}

static int ffio_get_events(struct thread_data *td, unsigned int min, unsigned int max,
			   const struct timespec *t)
{
	char err[ERRLEN] = "";
	long long timeout_ns = t ? (long long)t->tv_sec * 1000000000LL + t->tv_nsec : -1;
	int n = ffio_getevents(td->io_ops_data, min, max, timeout_ns, err, sizeof(err));

	if (n < 0)
		fail(td, EIO, "ferroblk getevents", err);
	return n;
}

static struct io_u *ffio_get_event(struct thread_data *td, int i)
{
	int error = 0;
	struct io_u *io_u = ffio_event(td->io_ops_data, i, &error);

	io_u->error = error;
	io_u->resid = error ? io_u->xfer_buflen : 0;
	return io_u;
}

static int ffio_open_file(struct thread_data *td, struct fio_file *f)
{
	(void)td;
	(void)f;
	return 0;
}

static int ffio_close_file(struct thread_data *td, struct fio_file *f)
{
	(void)td;
	(void)f;
	return 0;
}

static int ffio_alloc_iomem(struct thread_data *td, size_t total)
{
	char err[ERRLEN] = "";

	td->orig_buffer = ffio_iomem_alloc(td->io_ops_data, total, err, sizeof(err));
	if (!td->orig_buffer) {
		fail(td, ENOMEM, "ferroblk iomem_alloc", err);
		return 1;
	}
	return 0;
}

static void ffio_free_iomem(struct thread_data *td)
{
	if (td->io_ops_data)
		ffio_iomem_free(td->io_ops_data);
	td->orig_buffer = NULL;
}

/* Also reached through `get_ioengine` (fio/src/lib.rs): a Rust cdylib exports only Rust
 * symbols, and fio falls back to that function when `ioengine` is not found. */
struct ioengine_ops ioengine = {
	.name = "ferroblk",
	.version = FIO_IOOPS_VERSION,
	/* DISKLESSIO: file names are volumes, not paths fio should stat or create; MEMALIGN:
	 * page-aligned io_u buffers, which O_DIRECT file bdevs and vhost regions need. */
	.flags = FIO_RAWIO | FIO_DISKLESSIO | FIO_NOEXTEND | FIO_NODISKUTIL | FIO_MEMALIGN,
	.init = ffio_init,
	.queue = ffio_queue_io,
	/* No commit: what queue() accepted goes out at the next getevents, in one batch (one
	 * writev to the NVMe/TCP socket, one vhost-user kick), and fio accounts the submission
	 * itself. */
	.getevents = ffio_get_events,
	.event = ffio_get_event,
	.cleanup = ffio_cleanup,
	.open_file = ffio_open_file,
	.close_file = ffio_close_file,
	.get_file_size = ffio_get_file_size,
	.iomem_alloc = ffio_alloc_iomem,
	.iomem_free = ffio_free_iomem,
	.option_struct_size = sizeof(struct ferroblk_options),
	.options = options,
};

/* Runs at dlopen, before fio reads the options table: a fio of another version sees an ops
 * version it refuses ("bad ioops version") after our message, instead of misreading our table. */
__attribute__((constructor)) static void ffio_load(void)
{
	ffio_check_version();
	if (!version_ok) {
		/* Silent in a program that is not fio at all (the Rust test harness). */
		if (dlsym(RTLD_DEFAULT, "td_io_init"))
			ffio_version_error(NULL);
		ioengine.version = -1;
		ioengine.options = NULL;
		ioengine.option_struct_size = 0;
	}
}

struct ioengine_ops *ffio_ops(void)
{
	return &ioengine;
}
