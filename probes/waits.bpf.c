/*
 * waits.bpf.c: wait contexts. USDT probes for LWLock and heavyweight-lock
 * waits and relation reads/writes; system calls (syscalls.bpf.c) for the WAL (writes
 * and flushes to the fd of the open WAL segment, found when it is opened).
 */
#include "pgtrace.h"

int on_lwlock_wait_start(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (!st)
		return 0;
	st->acc.n_lwlock++;
	enter_ctx(st, CTX_LWLOCK, usdt_arg(ctx, 0), 0);
	return 0;
}

int on_lwlock_wait_done(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (st)
		leave_ctx(st, CTX_LWLOCK);
	return 0;
}

int on_lock_wait_start(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (!st)
		return 0;
	st->acc.n_lock++;
	enter_ctx(st, CTX_LOCK, 0, usdt_arg(ctx, 4));
	return 0;
}

int on_lock_wait_done(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (st)
		leave_ctx(st, CTX_LOCK);
	return 0;
}

int on_read_start(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (!st)
		return 0;
	st->acc.n_read++;
	enter_ctx(st, CTX_IO_READ, 0, 0);
	return 0;
}

int on_read_done(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (st)
		leave_ctx(st, CTX_IO_READ);
	return 0;
}

int on_write_start(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (!st)
		return 0;
	st->acc.n_write++;
	enter_ctx(st, CTX_IO_WRITE, 0, 0);
	return 0;
}

int on_write_done(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (st)
		leave_ctx(st, CTX_IO_WRITE);
	return 0;
}

/* ---- checkpoints of the traced cluster (for the report's timeline) ---- */

int on_checkpoint_start(struct pt_regs *ctx)
{
	u32 nslot = NCHECKPOINTS, slot;
	struct checkpoint_span *n, *cp;
	if (!current_state())
		return 0;
	n = checkpoints.lookup(&nslot);
	if (!n)
		return 0;
	slot = n->start % NCHECKPOINTS;
	cp = checkpoints.lookup(&slot);
	if (!cp)
		return 0;
	cp->start = bpf_ktime_get_ns();
	cp->end = 0;
	n->start++;
	return 0;
}

int on_checkpoint_done(struct pt_regs *ctx)
{
	u32 nslot = NCHECKPOINTS, slot;
	struct checkpoint_span *n, *cp;
	if (!current_state())
		return 0;
	n = checkpoints.lookup(&nslot);
	if (!n || n->start == 0)
		return 0;
	slot = (n->start - 1) % NCHECKPOINTS;
	cp = checkpoints.lookup(&slot);
	if (cp && cp->end == 0)
		cp->end = bpf_ktime_get_ns();
	return 0;
}

/* ---- WAL: track the segment's fd, then its writes and flushes ----------
 *
 * Backends open WAL files by relative path: "pg_wal/<24 hex digits>" is a
 * segment, "pg_wal/xlogtemp.<pid>" one being created.  The flush
 * (issue_xlog_fsync) is fdatasync (or fsync, per wal_sync_method) of the open
 * segment: `fsync`.  Writes to either, and the other syncs of segment
 * creation and its durable rename, are `wal_write`.
 */

static __always_inline int is_hex(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F');
}

static __always_inline void openat_enter(const char *filename)
{
	char head[8] = {};
	struct task_state *st = current_state();
	if (!st)
		return;
	bpf_probe_read_user(head, 8, filename);
	st->opening_wal = 0;
	if (head[0] == 'p' && head[1] == 'g' && head[2] == '_' && head[3] == 'w' &&
	    head[4] == 'a' && head[5] == 'l' && head[6] == '/')
		st->opening_wal = is_hex(head[7]) ? 1 : (head[7] == 'x' ? 2 : 0);
}

static __always_inline void openat_exit(struct task_state *st, long ret)
{
	if (ret >= 0) {
		if (st->opening_wal == 1)
			st->wal_fd = ret;
		else
			st->init_fd = ret;
	}
	st->opening_wal = 0;
}

static __always_inline void close_enter(u64 fd)
{
	struct task_state *st = current_state();
	if (!st)
		return;
	if (st->wal_fd >= 0 && fd == (u64)st->wal_fd)
		st->wal_fd = -1;
	if (st->init_fd >= 0 && fd == (u64)st->init_fd)
		st->init_fd = -1;
}

static __always_inline int is_wal_fd(struct task_state *st, u64 fd)
{
	return (st->wal_fd >= 0 && fd == (u64)st->wal_fd) ||
	       (st->init_fd >= 0 && fd == (u64)st->init_fd);
}

static __always_inline void sync_enter(u64 fd, int is_fsync)
{
	struct task_state *st = current_state();
	if (!st)
		return;
	if (st->wal_fd >= 0 && fd == (u64)st->wal_fd && is_fsync == WAL_FLUSH_IS_FSYNC) {
		st->acc.n_fsync++;
		enter_syscall_ctx(st, CTX_FSYNC);
	} else if (is_wal_fd(st, fd)) {
		st->acc.n_wal_write++;
		enter_syscall_ctx(st, CTX_WAL_WRITE);
	} else {
		enter_syscall_ctx(st, CTX_IO_WRITE);
	}
}


/*
 * Writes to WAL files: their own bucket, or the flush itself with O_DSYNC.
 * Writes to other files are data: a relation's extension (mdextend's pwrite,
 * mdzeroextend's pwritev or fallocate, outside the smgr write probes), a temp
 * file's, or a buffer's inside those probes (a nested context of the same kind).
 * Only the probes' writes are counted (n_write is PostgreSQL's `writes`).
 */
static __always_inline void write_enter(u64 fd)
{
	struct task_state *st = current_state();
	if (!st)
		return;
	if (!is_wal_fd(st, fd)) {
		enter_syscall_ctx(st, CTX_IO_WRITE);
		return;
	}
	st->acc.n_wal_write++;
	if (WAL_WRITE_IS_SYNC && st->wal_fd >= 0 && fd == (u64)st->wal_fd)
		enter_syscall_ctx(st, CTX_FSYNC);
	else
		enter_syscall_ctx(st, CTX_WAL_WRITE);
}
