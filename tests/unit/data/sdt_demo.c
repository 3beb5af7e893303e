/* Known USDT probes for pgtrace's note parser tests (built by the tests). */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>

__extension__ unsigned short demo_reg_semaphore
    __attribute__((unused)) __attribute__((section(".probes")));
__extension__ unsigned short demo_mem_semaphore
    __attribute__((unused)) __attribute__((section(".probes")));
__extension__ unsigned short demo_const_semaphore
    __attribute__((unused)) __attribute__((section(".probes")));

struct item {
    int a;
    long b;
};

/* Register forms: pinned registers give %rdi (8 bytes) and %eax (signed 4),
   and an unsigned char is a 1-byte unsigned argument. */
__attribute__((noinline)) void fire_reg(long x, int y, unsigned char flag)
{
    register long in_rdi __asm__("rdi") = x;
    register int in_eax __asm__("eax") = y;
    if (demo_reg_semaphore)
        STAP_PROBE3(demo, reg, in_rdi, in_eax, flag);
}

/* Memory forms: at -O0 a local lives at a negative offset from %rbp; at -O2
   a volatile local stays on the stack and a field is read through a pointer. */
__attribute__((noinline)) void fire_mem(struct item *it)
{
    long local = it->b;
    volatile short stacked = (short)it->a;
    if (demo_mem_semaphore)
        DTRACE_PROBE3(demo, mem, local, stacked, it->a);
}

/* Constant forms: $0 and a negative constant. */
__attribute__((noinline)) void fire_const(void)
{
    if (demo_const_semaphore)
        DTRACE_PROBE2(demo, const, 0, -5);
}

/* A probe without a semaphore: the note's semaphore address is 0. */
#undef _SDT_SEMAPHORE
#undef _SDT_NOTE_SEMAPHORE_USE
#define _SDT_SEMAPHORE(p, n) _SDT_ASM_1(_SDT_ASM_ADDR 0)
#define _SDT_NOTE_SEMAPHORE_USE(p, n)
__attribute__((noinline)) void fire_nosema(void)
{
    STAP_PROBE(demo, nosema);
}

int main(int argc, char **argv)
{
    struct item it = {argc, (long)argv};
    fire_reg(argc, -argc, (unsigned char)argc);
    fire_mem(&it);
    fire_const();
    fire_nosema();
    return 0;
}
