/**
 * A small QMP client (QEMU's docs/interop/qmp-spec.rst) over a unix socket: the greeting, then
 * `qmp_capabilities`, one command at a time with `execute`, and asynchronous events (MIGRATION, STOP,
 * RESUME...) kept with the host time they arrived so a test can wait for them and see when they came.
 */
import fs from 'node:fs';
import net from 'node:net';

/** An asynchronous QMP event and the host time (Date.now()) it arrived. */
export interface QmpEvent {
  readonly event: string;
  readonly data: Record<string, unknown>;
  readonly receivedAt: number;
}

export class QmpClient {
  /** Every event so far, in order. */
  readonly events: QmpEvent[] = [];
  private buffer = '';
  private readonly replies: Record<string, unknown>[] = [];
  private wakers: (() => void)[] = [];
  private closedWith: Error | null = null;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => {
      this.buffer += text;
      let nl;
      while ((nl = this.buffer.indexOf('\n')) >= 0) {
        const message = JSON.parse(this.buffer.slice(0, nl)) as Record<string, unknown>;
        this.buffer = this.buffer.slice(nl + 1);
        if (typeof message.event === 'string') {
          this.events.push({ event: message.event, data: (message.data ?? {}) as Record<string, unknown>, receivedAt: Date.now() });
        } else {
          this.replies.push(message);
        }
      }
      this.wake();
    });
    const closed = (err?: Error) => {
      this.closedWith ??= err ?? new Error('QMP connection closed');
      this.wake();
    };
    socket.on('error', closed);
    socket.on('close', () => closed());
  }

  /** Connect to QEMU's `-qmp unix:PATH,server=on,wait=off` (waiting for the socket to appear) and leave capabilities negotiation. */
  static async connect(socketPath: string, timeoutMs = 30_000): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    while (!fs.existsSync(socketPath)) {
      if (Date.now() > deadline) throw new Error(`no QMP socket at ${socketPath}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const socket = net.connect(socketPath);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new QmpClient(socket);
    const greeting = await client.nextReply(timeoutMs);
    if (!('QMP' in greeting)) throw new Error(`not a QMP greeting: ${JSON.stringify(greeting)}`);
    await client.execute('qmp_capabilities');
    return client;
  }

  /** Run `command`; resolves with its `return`, rejects with QEMU's error. */
  async execute(command: string, args?: object, timeoutMs = 60_000): Promise<unknown> {
    this.socket.write(`${JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args })}\n`);
    const reply = await this.nextReply(timeoutMs);
    if ('error' in reply) throw new Error(`QMP ${command}: ${JSON.stringify(reply.error)}`);
    return reply.return;
  }

  /** The first event named `name` (from the start of the connection) that `match` accepts. */
  async waitEvent(name: string, match: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = 120_000): Promise<QmpEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.events.find((e) => e.event === name && match(e.data));
      if (found !== undefined) return found;
      if (this.closedWith !== null) throw new Error(`QMP event ${name} never came: ${this.closedWith.message}`);
      if (Date.now() > deadline) throw new Error(`QMP event ${name} did not come within ${timeoutMs} ms; events: ${this.events.map((e) => e.event).join(' ')}`);
      await this.sleep(deadline);
    }
  }

  close(): void {
    this.socket.destroy();
  }

  private async nextReply(timeoutMs: number): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    while (this.replies.length === 0) {
      if (this.closedWith !== null) throw this.closedWith;
      if (Date.now() > deadline) throw new Error(`no QMP reply within ${timeoutMs} ms`);
      await this.sleep(deadline);
    }
    return this.replies.shift()!;
  }

  private sleep(deadline: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, Math.max(0, Math.min(1000, deadline - Date.now())));
      this.wakers.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  private wake(): void {
    for (const wake of this.wakers.splice(0)) wake();
  }
}
