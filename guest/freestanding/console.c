/*
 * console.c - COM1 as a polled 16550A UART, and the line printer say().
 *
 * Registers at COM1_BASE + n (National Semiconductor PC16550D datasheet,
 * "Register Summary"; DLAB = 0):
 *   0 THR  transmit holding register (write); RBR receive buffer (read)
 *   1 IER  interrupt enable
 *   3 LCR  line control: word length, stop bits, parity, DLAB
 *   5 LSR  line status; bit 5 THRE = THR empty, may write the next byte;
 *          bit 0 DR = a received byte waits in RBR
 * No interrupts are used: every byte waits for THRE, then goes to THR.  On
 * a VMM each IN and OUT is one exit, so a byte costs two.  The UART is driven
 * at CPL0 only (serial_init from cpu_init_bsp; CPL3 lines arrive through the
 * SYS_CONSOLE_WRITE system call): see cpu.h on port I/O at CPL3 under PVM.
 */
#include <stdarg.h>

#include "console.h"
#include "cpu.h"
#include "fmt.h"
#include "io.h"
#include "layout.h"

#define UART_THR        0
#define UART_IER        1
#define UART_LCR        3
#define UART_LSR        5
#define UART_LCR_8N1    0x03    /* 8 data bits, no parity, 1 stop bit */
#define UART_LSR_THRE   0x20
#define UART_LSR_DR     0x01

void serial_init(void)
{
	/* No baud divisor: a virtual UART has no line to clock.  Interrupts
	 * off, 8N1 so a real-UART model has a defined frame format. */
	outb(COM1_BASE + UART_IER, 0);
	outb(COM1_BASE + UART_LCR, UART_LCR_8N1);
}

static void serial_putc(char c)
{
	while (!(inb(COM1_BASE + UART_LSR) & UART_LSR_THRE))
		cpu_relax();
	outb(COM1_BASE + UART_THR, (uint8_t)c);
}

void serial_write(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\n')
			serial_putc('\r');
		serial_putc(s[i]);
	}
}

/* At CPL0 write the UART directly; at CPL3 one system call per line (port
 * I/O at CPL3 faults on PVM, see cpu.h). */
static void console_write(const char *s, size_t n)
{
	if (cpu_cpl() == 0)
		serial_write(s, n);
	else
		syscall2(SYS_CONSOLE_WRITE, (uintptr_t)s, n);
}

void say(const char *fmt, ...)
{
	char line[256];
	size_t n = sizeof(SAY_PREFIX) - 1;
	va_list ap;

	memcpy(line, SAY_PREFIX, n);
	va_start(ap, fmt);
	n += vformat(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	line[n++] = '\n';
	console_write(line, n);
}

/* The next byte the host typed, or -1 if none waits (two port reads, at any
 * CPL: by system call at CPL3). */
int serial_getc(void)
{
	if (!(sys_inb(COM1_BASE + UART_LSR) & UART_LSR_DR))
		return -1;
	return sys_inb(COM1_BASE + UART_THR);
}
