/* The host's page-in limit: `postcopy bench pagein` written in C (section `limit`).
 *
 *   limit DUMP MODE        MODE = exit | classic | classic-naive
 *
 * DUMP is written by postcopy/bench/limit.py: the pages below DATA_GPA of a guest that Python
 * booted with the `pagein` workload (page tables, GDT/IDT, code, stacks, boot parameters), each
 * vCPU's struct kvm_regs and kvm_sregs, and the CPUID entries. This program builds the same VM
 * (irqchip, PIT, one memslot at GPA 0), installs those pages, registers all of RAM with
 * userfaultfd and runs the vCPUs: every data page comes from a source buffer, one page per
 * fault, with UFFDIO_COPY; the first qword of each data page is its gpa, which the guest checks
 * (vmm/guest/touch.py, TOUCH_CHECK). Placement and mode as in the Python bench:
 *   exit           UFFD_FEATURE_SIGBUS; each vCPU thread installs (DONTWAKE) and completes its
 *                  MMIO / emulation-failure exits itself; vCPUs pinned round robin.
 *   classic        vCPUs pinned; one handler thread per CPU they use, pinned to it: poll, read
 *                  one message, UFFDIO_COPY with wake (as Python's placed handlers do).
 *   classic-naive  one unpinned handler, the same loop, vCPUs unpinned.
 * Prints one JSON object: pages, seconds (vCPU threads started -> last vCPU's GS_DONE), pages_per_s.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ULL
#define MAX_VCPUS 32
#define FILL 0xA5
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39 /* upstream: KVM_RUN -EFAULT, memory_fault.gpa after flags */
#endif

struct dump_header { /* limit.py DUMP_HEADER, little-endian */
    char magic[8];
    uint32_t nvcpus, cpuid_bytes;
    uint64_t mem_size, low_size;
    uint32_t regs_size, sregs_size, gs_port, gs_exception, gs_done, reserved;
};

enum mode { EXIT, CLASSIC, NAIVE };

struct vcpu {
    int fd, cpu;
    struct kvm_run *run;
    pthread_t thread;
    uint64_t done_ns, visited, mismatches;
};

static enum mode mode;
static uint8_t *ram, *src;
static uint64_t mem_size, low_size;
static uint32_t gs_port, gs_exception, gs_done;
static int uffd, stop_pipe[2];
static int ncpus, cpus[CPU_SETSIZE];

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "limit: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set)) die("sched_setaffinity(%d): %s", cpu, strerror(errno));
}

/* UFFDIO_COPY of [gpa, gpa+len) from the source; a page that exists already (EEXIST: another
 * thread was first) is stepped over. */
static void install(uint64_t gpa, uint64_t len, uint64_t mode_flags) {
    while (len) {
        struct uffdio_copy c = {.dst = (uint64_t)ram + gpa, .src = (uint64_t)src + gpa, .len = len, .mode = mode_flags};
        if (ioctl(uffd, UFFDIO_COPY, &c) == 0) return;
        uint64_t done = c.copy > 0 ? (uint64_t)c.copy : 0;
        if (errno == EEXIST) done += PAGE;
        else if (errno != EAGAIN) die("UFFDIO_COPY(gpa %#lx, %#lx): %s", gpa, len, strerror(errno));
        if (done >= len) return;
        gpa += done;
        len -= done;
    }
}

static void *vcpu_main(void *arg) {
    struct vcpu *v = arg;
    struct kvm_run *run = v->run;
    if (v->cpu >= 0) pin(v->cpu);
    for (;;) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR) continue;
            if (errno == EFAULT && run->exit_reason == KVM_EXIT_MEMORY_FAULT) {
                uint64_t gpa = ((uint64_t *)&run->mmio)[1];
                install(gpa & ~(PAGE - 1), PAGE, UFFDIO_COPY_MODE_DONTWAKE);
                continue;
            }
            die("KVM_RUN: %s", strerror(errno));
        }
        switch (run->exit_reason) {
        case KVM_EXIT_MMIO: { /* this host: a data access to a missing page */
            uint64_t gpa = run->mmio.phys_addr, len = run->mmio.len;
            if (gpa + len > mem_size) die("MMIO outside RAM at %#lx", gpa);
            uint64_t first = gpa & ~(PAGE - 1), last = (gpa + len - 1) & ~(PAGE - 1);
            install(first, last - first + PAGE, UFFDIO_COPY_MODE_DONTWAKE);
            if (run->mmio.is_write) memcpy(ram + gpa, run->mmio.data, len);
            else memcpy(run->mmio.data, ram + gpa, len);
            break;
        }
        case KVM_EXIT_INTERNAL_ERROR: { /* this host: an instruction fetch from a missing page */
            struct kvm_regs regs;
            if (run->internal.suberror != KVM_INTERNAL_ERROR_EMULATION) die("internal error %u", run->internal.suberror);
            if (ioctl(v->fd, KVM_GET_REGS, &regs)) die("KVM_GET_REGS: %s", strerror(errno));
            struct kvm_translation tr = {.linear_address = regs.rip};
            if (ioctl(v->fd, KVM_TRANSLATE, &tr) || !tr.valid || tr.physical_address >= mem_size)
                die("emulation failure at rip %#llx", regs.rip);
            install(tr.physical_address & ~(PAGE - 1), PAGE, UFFDIO_COPY_MODE_DONTWAKE);
            break;
        }
        case KVM_EXIT_IO: {
            uint32_t value = *(uint32_t *)((uint8_t *)run + run->io.data_offset);
            if (run->io.port != gs_port || run->io.direction != KVM_EXIT_IO_OUT) break;
            if (value == gs_exception) die("the guest took an exception (see its r8..r11)");
            if (value == gs_done) { /* r8 = pages visited, r9 = mismatches; its hlt would not come back */
                struct kvm_regs regs;
                v->done_ns = now_ns();
                if (ioctl(v->fd, KVM_GET_REGS, &regs)) die("KVM_GET_REGS: %s", strerror(errno));
                v->visited = regs.r8;
                v->mismatches = regs.r9;
                return NULL;
            }
            break;
        }
        default:
            die("unexpected exit reason %u", run->exit_reason);
        }
    }
}

struct handler { int cpu; pthread_t thread; };

/* One message a read. Reading up to 64 and copying each contiguous run paged in 10-19% slower at
 * 2 and 4 vCPUs on the development host (32 MiB; about equal at 1 vCPU): a handler that takes
 * another vCPU's fault as well makes that vCPU wait for both copies and for a wake-up across
 * CPUs, where the handler beside it would have taken it. */
static void *handler_main(void *arg) {
    struct handler *h = arg;
    struct uffd_msg msg;
    struct pollfd fds[2] = {{.fd = uffd, .events = POLLIN}, {.fd = stop_pipe[0], .events = POLLIN}};
    if (h->cpu >= 0) pin(h->cpu);
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll: %s", strerror(errno));
        }
        if (fds[1].revents) return NULL;
        if (read(uffd, &msg, sizeof msg) < 0) {
            if (errno == EAGAIN) continue; /* another handler read it */
            die("read(uffd): %s", strerror(errno));
        }
        if (msg.event == UFFD_EVENT_PAGEFAULT)
            install((msg.arg.pagefault.address - (uint64_t)ram) & ~(PAGE - 1), PAGE, 0);
    }
}

static void *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    rewind(f);
    void *buf = malloc(*size);
    if (!buf || fread(buf, 1, *size, f) != *size) die("cannot read %s", path);
    fclose(f);
    return buf;
}

static void *anon(uint64_t size) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) die("mmap %lu: %s", size, strerror(errno));
    return p;
}

static int open_uffd(uint64_t features) {
    int fd, dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(dev);
    } else {
        fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    }
    if (fd < 0) die("userfaultfd: %s", strerror(errno));
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api)) die("UFFDIO_API: %s", strerror(errno));
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 3) die("usage: limit DUMP exit|classic|classic-naive");
    if (!strcmp(argv[2], "exit")) mode = EXIT;
    else if (!strcmp(argv[2], "classic")) mode = CLASSIC;
    else if (!strcmp(argv[2], "classic-naive")) mode = NAIVE;
    else die("unknown mode %s", argv[2]);

    size_t dump_size;
    uint8_t *dump = read_file(argv[1], &dump_size);
    struct dump_header hd;
    memcpy(&hd, dump, sizeof hd);
    if (memcmp(hd.magic, "PCLIMIT1", 8) || hd.regs_size != sizeof(struct kvm_regs) ||
        hd.sregs_size != sizeof(struct kvm_sregs) || hd.nvcpus < 1 || hd.nvcpus > MAX_VCPUS ||
        dump_size != sizeof hd + hd.low_size + hd.nvcpus * (hd.regs_size + hd.sregs_size) + hd.cpuid_bytes)
        die("%s is not a guest dump this program reads", argv[1]);
    mem_size = hd.mem_size;
    low_size = hd.low_size;
    gs_port = hd.gs_port;
    gs_exception = hd.gs_exception;
    gs_done = hd.gs_done;
    uint8_t *low = dump + sizeof hd, *state = low + low_size;
    uint8_t *cpuid = state + hd.nvcpus * (hd.regs_size + hd.sregs_size);

    cpu_set_t allowed;
    sched_getaffinity(0, sizeof allowed, &allowed);
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &allowed)) cpus[ncpus++] = c;

    /* The source: every data page filled, its first qword its gpa (vmm/guest/touch.check_expected). */
    src = anon(mem_size);
    memset(src + low_size, FILL, mem_size - low_size);
    for (uint64_t gpa = low_size; gpa < mem_size; gpa += PAGE) memcpy(src + gpa, &gpa, 8);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm: %s", strerror(errno));
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM: %s", strerror(errno));
    ram = anon(mem_size);
    memcpy(ram, low, low_size); /* before registering: these pages are present from the start */
    struct kvm_userspace_memory_region region = {.slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
                                                 .userspace_addr = (uint64_t)ram};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region)) die("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
    struct kvm_pit_config pit = {0};
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) || ioctl(vm, KVM_CREATE_PIT2, &pit)) die("irqchip/PIT: %s", strerror(errno));
    uffd = open_uffd(mode == EXIT ? UFFD_FEATURE_SIGBUS : 0);
    struct uffdio_register reg = {.range = {.start = (uint64_t)ram, .len = mem_size}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER: %s", strerror(errno));

    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    static struct vcpu vcpus[MAX_VCPUS];
    int n = hd.nvcpus;
    for (int i = 0; i < n; i++) {
        struct vcpu *v = &vcpus[i];
        uint8_t *st = state + i * (hd.regs_size + hd.sregs_size);
        v->fd = ioctl(vm, KVM_CREATE_VCPU, i);
        if (v->fd < 0) die("KVM_CREATE_VCPU: %s", strerror(errno));
        v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (v->run == MAP_FAILED) die("mmap kvm_run: %s", strerror(errno));
        struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
        if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) || ioctl(v->fd, KVM_SET_SREGS, st + hd.regs_size) ||
            ioctl(v->fd, KVM_SET_REGS, st) || ioctl(v->fd, KVM_SET_MP_STATE, &mp))
            die("vCPU %d state: %s", i, strerror(errno));
        v->cpu = mode == NAIVE ? -1 : cpus[i % ncpus];
    }

    struct handler handlers[CPU_SETSIZE];
    int nh = 0;
    if (pipe2(stop_pipe, O_CLOEXEC)) die("pipe2: %s", strerror(errno));
    if (mode == NAIVE) handlers[nh++] = (struct handler){.cpu = -1};
    if (mode == CLASSIC)
        for (int i = 0; i < n && i < ncpus; i++) handlers[nh++] = (struct handler){.cpu = cpus[i]};
    for (int i = 0; i < nh; i++) pthread_create(&handlers[i].thread, NULL, handler_main, &handlers[i]);

    uint64_t t0 = now_ns(), end = 0, visited = 0, mismatches = 0;
    for (int i = 0; i < n; i++) pthread_create(&vcpus[i].thread, NULL, vcpu_main, &vcpus[i]);
    for (int i = 0; i < n; i++) {
        pthread_join(vcpus[i].thread, NULL);
        end = vcpus[i].done_ns > end ? vcpus[i].done_ns : end;
        visited += vcpus[i].visited;
        mismatches += vcpus[i].mismatches;
    }
    if (write(stop_pipe[1], "x", 1) != 1) die("write: %s", strerror(errno));
    for (int i = 0; i < nh; i++) pthread_join(handlers[i].thread, NULL);

    uint64_t pages = (mem_size - low_size) / PAGE, wrong = 0;
    for (uint64_t gpa = low_size; gpa < mem_size; gpa += PAGE) /* the guest wrote ~(what it read) */
        wrong += *(uint64_t *)(ram + gpa) != ~gpa;
    double seconds = (end - t0) / 1e9;
    printf("{\"mode\": \"%s\", \"vcpus\": %d, \"pages\": %lu, \"seconds\": %.6f, \"pages_per_s\": %.1f, "
           "\"visited\": %lu, \"mismatches\": %lu, \"wrong_after\": %lu}\n",
           argv[2], n, pages, seconds, pages / seconds, visited, mismatches, wrong);
    return visited == pages && !mismatches && !wrong ? 0 : 1;
}
