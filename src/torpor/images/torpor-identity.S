# torpor-identity: the guest's resident identity helper (x86-64 Linux, no libc).
#
# Started by the guest's init with its virtio port (org.torpor.identity) as argv[1], it
# waits on the port, which costs nothing while the guest idles; the host writes a request
# right after it resumes a restored VM or a fork, and the helper applies it with system
# calls only (no process is started: under TCG each one cost a fork tens of ms) and
# answers. The layout is guest/identity.py's (REQUEST, REPLY); flags pick the steps:
#
#   request (176 bytes)                        reply (40 bytes)
#     0  u32 magic "TPID"                        0  u32 magic "TPOK"
#     4  u32 flags: 1 clock, 2 hostname,         4  u32 the step that failed (0: none)
#               4 MAC, 8 randomness              8  u64 the request's nonce
#     8  u64 nonce                              16  i64 0, or the failed call's -errno
#    16  struct timespec: clock_settime(CLOCK_REALTIME)   24  the guest's timespec before
#    32  struct ifreq: ioctl(SIOCSIFHWADDR) (name, ARPHRD_ETHER, the MAC)
#    72  u64 hostname length, 80 hostname[64] (a newline after it): sethostname, and
#        /etc/hostname overwritten and cut to length where /etc is writable
#   144  32 bytes written into /dev/urandom, then ioctl(RNDRESEEDCRNG): the crng rekeyed
#
# The guest has no compiler, so build-guest.sh writes the assembled bytes with printf;
# tests/unit/test_identity_helper.py assembles this file (binutils) and compares.
# Regenerate: python -m tests.unit.test_identity_helper
        .intel_syntax noprefix
        .set REQUEST, 176
        .set REPLY, 40
        .set MAGIC, 0x44495054          # "TPID"
        .set ANSWER, 0x4b4f5054         # "TPOK"
        .set SYS_read, 0
        .set SYS_write, 1
        .set SYS_open, 2
        .set SYS_close, 3
        .set SYS_ftruncate, 77
        .set SYS_ioctl, 16
        .set SYS_socket, 41
        .set SYS_exit, 60
        .set SYS_sethostname, 170
        .set SYS_clock_settime, 227
        .set SYS_clock_gettime, 228
        .set EINTR, 4
        .set EINVAL, 22

        .text
        .globl _start
_start:
        mov rdi, [rsp + 16]             # argv[1]: the port
        mov eax, SYS_open
        mov esi, 2                      # O_RDWR
        xor edx, edx
        syscall
        test eax, eax
        js exit
        mov r12d, eax                   # the port's fd

next:   xor r13d, r13d                  # bytes of the request read so far
fill:   xor eax, eax                    # read(port, request + got, REQUEST - got)
        mov edi, r12d
        lea rsi, [rip + request]
        add rsi, r13
        mov edx, REQUEST
        sub edx, r13d
        syscall
        cmp rax, -EINTR
        je fill
        test rax, rax
        jle exit                        # an error, or the host gone: init starts us again
        add r13d, eax
        cmp r13d, REQUEST
        jb fill

        mov r14d, 5                     # step 5: the request itself
        mov r15, -EINVAL
        cmp dword ptr [rip + request], MAGIC
        jne answer
        mov ebx, [rip + request + 4]    # flags
        mov eax, SYS_clock_gettime      # the guest's time before any change, for the host
        xor edi, edi                    # CLOCK_REALTIME
        lea rsi, [rip + reply + 24]
        syscall

        mov r14d, 1                     # step 1: the wall clock
        test bl, 1
        jz 1f
        mov eax, SYS_clock_settime
        xor edi, edi                    # CLOCK_REALTIME
        lea rsi, [rip + request + 16]
        syscall
        mov r15, rax
        test rax, rax
        js answer

1:      mov r14d, 2                     # step 2: the hostname
        test bl, 2
        jz 2f
        mov eax, SYS_sethostname
        lea rdi, [rip + request + 80]
        mov rsi, [rip + request + 72]
        syscall
        mov r15, rax
        test rax, rax
        js answer
        mov eax, SYS_open               # and /etc/hostname, where /etc is writable
        lea rdi, [rip + etc_hostname]
        mov esi, 0x41                   # O_WRONLY | O_CREAT; no O_TRUNC: ext4 writes out a
        mov edx, 0x1a4                  # file cut to 0 as it closes (auto_da_alloc), ~15 ms
        syscall                         # of a fork under TCG; overwritten, then cut below
        test eax, eax
        js 2f
        mov ebp, eax
        mov eax, SYS_write              # the name and the newline the host put after it
        mov edi, ebp
        lea rsi, [rip + request + 80]
        mov rdx, [rip + request + 72]
        inc rdx
        syscall
        mov eax, SYS_ftruncate          # what a longer old name left after them
        mov edi, ebp
        mov rsi, [rip + request + 72]
        inc rsi
        syscall
        mov eax, SYS_close
        mov edi, ebp
        syscall

2:      mov r14d, 3                     # step 3: the MAC, changed live
        test bl, 4
        jz 3f
        mov eax, SYS_socket
        mov edi, 2                      # AF_INET
        mov esi, 2                      # SOCK_DGRAM
        xor edx, edx
        syscall
        mov r15, rax
        test rax, rax
        js answer
        mov ebp, eax
        mov eax, SYS_ioctl
        mov edi, ebp
        mov esi, 0x8924                 # SIOCSIFHWADDR
        lea rdx, [rip + request + 32]
        syscall
        mov r15, rax
        mov eax, SYS_close
        mov edi, ebp
        syscall
        test r15, r15
        js answer

3:      mov r14d, 4                     # step 4: the randomness
        test bl, 8
        jz done
        mov eax, SYS_open
        lea rdi, [rip + urandom]
        mov esi, 1                      # O_WRONLY
        xor edx, edx
        syscall
        mov r15, rax
        test rax, rax
        js answer
        mov ebp, eax
        mov eax, SYS_write
        mov edi, ebp
        lea rsi, [rip + request + 144]
        mov edx, 32
        syscall
        mov r15, rax
        test rax, rax
        js 4f
        mov eax, SYS_ioctl
        mov edi, ebp
        mov esi, 0x5207                 # RNDRESEEDCRNG
        xor edx, edx
        syscall
        mov r15, rax
4:      mov eax, SYS_close
        mov edi, ebp
        syscall
        test r15, r15
        js answer

done:   xor r14d, r14d
        xor r15d, r15d
answer: mov dword ptr [rip + reply], ANSWER
        mov [rip + reply + 4], r14d
        mov rax, [rip + request + 8]
        mov [rip + reply + 8], rax
        mov [rip + reply + 16], r15
        mov eax, SYS_write
        mov edi, r12d
        lea rsi, [rip + reply]
        mov edx, REPLY
        syscall
        test rax, rax
        jns next

exit:   mov edi, eax                    # an error's -errno as the status
        neg edi
        mov eax, SYS_exit
        syscall

urandom: .asciz "/dev/urandom"
etc_hostname: .asciz "/etc/hostname"

        .bss
        .align 16
request: .skip REQUEST
reply:  .skip REPLY
