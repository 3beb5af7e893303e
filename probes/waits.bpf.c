/*
 * waits.bpf.c: wait contexts. USDT probes for LWLock and heavyweight-lock
 * waits and relation reads/writes; syscall tracepoints for the WAL (writes
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

/* ---- WAL: track the segment's fd, then its writes and flushes ---------- */

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
	char head[8] = {};
	struct task_state *st = current_state();
	if (!st)
		return 0;
	bpf_probe_read_user(head, 7, args->filename);
	st->opening_wal = head[0] == 'p' && head[1] == 'g' && head[2] == '_' &&
			  head[3] == 'w' && head[4] == 'a' && head[5] == 'l' && head[6] == '/';
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	struct task_state *st = current_state();
	if (!st || !st->opening_wal)
		return 0;
	st->opening_wal = 0;
	if (args->ret >= 0)
		st->wal_fd = args->ret;
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
	struct task_state *st = current_state();
	if (st && st->wal_fd >= 0 && args->fd == (u64)st->wal_fd)
		st->wal_fd = -1;
	return 0;
}

static __always_inline void sync_enter(u64 fd)
{
	struct task_state *st = current_state();
	if (!st)
		return;
	if (st->wal_fd >= 0 && fd == (u64)st->wal_fd) {
		st->acc.n_fsync++;
		enter_syscall_ctx(st, CTX_FSYNC);
	} else {
		enter_syscall_ctx(st, CTX_IO_WRITE);
	}
}

TRACEPOINT_PROBE(syscalls, sys_enter_fdatasync) { sync_enter(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_fdatasync) { leave_syscall_ctx(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_fsync) { sync_enter(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_fsync) { leave_syscall_ctx(); return 0; }

/* Writes to the WAL segment: its own bucket, or the flush itself with O_DSYNC. */
static __always_inline void write_enter(u64 fd)
{
	struct task_state *st = current_state();
	if (!st || st->wal_fd < 0 || fd != (u64)st->wal_fd)
		return;
	st->acc.n_wal_write++;
	enter_syscall_ctx(st, WAL_WRITE_IS_SYNC ? CTX_FSYNC : CTX_WAL_WRITE);
}

TRACEPOINT_PROBE(syscalls, sys_enter_pwrite64) { write_enter(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_pwrite64) { leave_syscall_ctx(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_pwritev) { write_enter(args->fd); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_pwritev) { leave_syscall_ctx(); return 0; }
