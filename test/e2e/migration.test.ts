/**
 * Live migration on one host with vhost-user-blk: a source QEMU with one blk daemon, a destination QEMU
 * (`-incoming tcp:127.0.0.1:PORT`) with a second daemon on the same image, and `migrate` over QMP while
 * the guest reads known patterns into its page cache (see `script`). The guest carries on on the
 * destination, checks what it read, writes more patterns with O_DIRECT and reads them back; the host
 * checks the image too.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

import { startDaemon } from '../helpers/daemon';
import { guestImage, GUEST_LIBRARY_PATH, GUEST_SCRIPT_PATH, writeTestInitrd } from '../helpers/guest-image';
import { guestTest } from '../helpers/guest-test';
import { GUEST_LIBRARY, qemuArgs, qemuBinary } from '../helpers/qemu-guest';

const CHUNKS = 300;
const CHUNK = 64 * 1024;
/** Chunks the guest reads during the migration (64 MiB: longer than the migration's first pass). */
const READS = 1024;

/** The guest's chunk `i`: "chunk-<i>\n" repeated, cut to CHUNK bytes (the guest makes it with `yes`). */
function chunk(i: number): Buffer {
  const line = Buffer.from(`chunk-${i}\n`);
  const out = Buffer.alloc(CHUNK);
  for (let at = 0; at < CHUNK; at += line.length) line.copy(out, at);
  return out;
}

/**
 * The host fills chunks CHUNKS .. CHUNKS+READS-1 before boot. During the migration the guest reads them
 * into its page cache (buffered): the daemon writes those pages, which QEMU's own dirty tracking (CPU
 * writes) never sees, so only the daemon's dirty log gets them to the destination. After the switch
 * the guest reads them again from the cache, then writes chunks 0 .. CHUNKS-1 and reads them back.
 */
const script = `
# Linux drops a block device's page cache at its last close: fd 3 keeps /dev/vda open throughout.
exec 3</dev/vda
mark reading start
i=${CHUNKS}
while [ $i -lt ${CHUNKS + READS} ]; do
  dd if=/dev/vda of=/dev/null bs=${CHUNK} skip=$i count=1 2>/dev/null || echo "read $i failed"
  # Paced, so the reads span the whole migration.
  [ $(( i % 8 )) -ne 0 ] || sleep 0.05
  i=$(( i + 1 ))
done
mark reading done
stale=0
i=${CHUNKS}
while [ $i -lt ${CHUNKS + READS} ]; do
  want=$(yes "chunk-$i" | head -c ${CHUNK} | md5sum | cut -d' ' -f1)
  got=$(dd if=/dev/vda bs=${CHUNK} skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$want" = "$got" ] || stale=$(( stale + 1 ))
  i=$(( i + 1 ))
done
mark stale $stale
i=0
mark writing start
while [ $i -lt ${CHUNKS} ]; do
  yes "chunk-$i" | head -c ${CHUNK} > /tmp/c
  dd if=/tmp/c of=/dev/vda bs=${CHUNK} seek=$i count=1 oflag=direct conv=notrunc 2>/dev/null || echo "write $i failed"
  i=$(( i + 1 ))
done
mark writing done
bad=0
i=0
while [ $i -lt ${CHUNKS} ]; do
  want=$(yes "chunk-$i" | head -c ${CHUNK} | md5sum | cut -d' ' -f1)
  got=$(dd if=/dev/vda bs=${CHUNK} skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$want" = "$got" ] || bad=$(( bad + 1 ))
  i=$(( i + 1 ))
done
mark bad $bad
`;

/** A QEMU process with its console lines and a QMP socket. */
class Qemu {
  readonly child: ChildProcess;
  readonly lines: string[] = [];
  stderr = '';
  private partial = '';
  private waiters: (() => void)[] = [];

  constructor(args: string[]) {
    this.child = spawn(qemuBinary(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout!.setEncoding('utf8');
    this.child.stdout!.on('data', (text: string) => {
      const parts = (this.partial + text).split('\n');
      this.partial = parts.pop() ?? '';
      this.lines.push(...parts.map((l) => l.replace(/\r/g, '')));
      for (const wake of this.waiters.splice(0)) wake();
    });
    this.child.stderr!.setEncoding('utf8');
    this.child.stderr!.on('data', (text: string) => (this.stderr += text));
    this.child.once('exit', () => {
      for (const wake of this.waiters.splice(0)) wake();
    });
  }

  /** Wait for a console line matching `re` (or the process to end, then throw). */
  async waitLine(re: RegExp, timeoutMs: number): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = this.lines.find((l) => re.test(l));
      if (line !== undefined) return line;
      if (this.child.exitCode !== null || this.child.signalCode !== null || Date.now() > deadline) {
        throw new Error(`no console line ${re} (exit ${this.child.exitCode}): ${this.stderr}\n${this.lines.slice(-30).join('\n')}`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 500);
        this.waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}

/** A QMP client: one command at a time, events skipped. */
async function qmp(socketPath: string): Promise<{ execute(command: string, args?: object): Promise<unknown>; close(): void }> {
  for (let tries = 0; !fs.existsSync(socketPath); tries++) {
    if (tries > 200) throw new Error(`no QMP socket at ${socketPath}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const socket = net.connect(socketPath);
  let buffer = '';
  const replies: unknown[] = [];
  let wake: (() => void) | null = null;
  socket.setEncoding('utf8');
  socket.on('data', (text: string) => {
    buffer += text;
    let nl;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const message = JSON.parse(buffer.slice(0, nl)) as Record<string, unknown>;
      buffer = buffer.slice(nl + 1);
      if (!('event' in message)) replies.push(message);
      wake?.();
    }
  });
  const next = async (): Promise<Record<string, unknown>> => {
    while (replies.length === 0) await new Promise<void>((resolve) => (wake = resolve));
    return replies.shift() as Record<string, unknown>;
  };
  await next(); // greeting
  const execute = async (command: string, args?: object): Promise<unknown> => {
    socket.write(`${JSON.stringify({ execute: command, arguments: args })}\n`);
    const reply = await next();
    if ('error' in reply) throw new Error(`QMP ${command}: ${JSON.stringify(reply.error)}`);
    return reply.return;
  };
  await execute('qmp_capabilities');
  return { execute, close: () => socket.destroy() };
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
    server.on('error', reject);
  });
}

guestTest('blk: live migration to a second QEMU and daemon while the guest reads and writes; every chunk verifies', async (t) => {
  t.timeout(300_000);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-migration-'));
  const file = path.join(dir, 'disk.img');
  const prefilled = Buffer.alloc((CHUNKS + READS) * CHUNK);
  for (let i = CHUNKS; i < CHUNKS + READS; i++) chunk(i).copy(prefilled, i * CHUNK);
  fs.writeFileSync(file, prefilled);
  const image = await guestImage();
  const initrd = path.join(dir, 'initrd.img');
  await writeTestInitrd(image, initrd, [
    { path: GUEST_LIBRARY_PATH, data: GUEST_LIBRARY },
    { path: GUEST_SCRIPT_PATH, data: `. ${GUEST_LIBRARY_PATH}\n${script}\n`, mode: 0o755 },
  ]);
  const source = await startDaemon('blk', ['--file', file, '--metrics', '0']);
  const destination = await startDaemon('blk', ['--file', file, '--metrics', '0']);
  const port = await freePort();
  const machine = (socketPath: string, qmpPath: string, extra: string[]): string[] =>
    qemuArgs(image, initrd, {
      // Page cache pages are then not zeroed by the CPU on allocation, which would mark them dirty in
      // QEMU's own tracking and hide a missing mark of the daemon's.
      append: 'init_on_alloc=0',
      qemuArgs: ['-chardev', `socket,id=blk0,path=${socketPath}`, '-device', 'vhost-user-blk-pci,chardev=blk0', '-qmp', `unix:${qmpPath},server=on,wait=off`, ...extra],
    });
  const src = new Qemu(machine(source.socketPath, path.join(dir, 'src.qmp'), []));
  const dst = new Qemu(machine(destination.socketPath, path.join(dir, 'dst.qmp'), ['-incoming', `tcp:127.0.0.1:${port}`]));
  try {
    await src.waitLine(/VHOSTD-MARK reading=start/, 150_000);
    const control = await qmp(path.join(dir, 'src.qmp'));
    // Slow enough that the first pass over guest memory overlaps many of the guest's reads.
    await control.execute('migrate-set-parameters', { 'max-bandwidth': 32 * 1024 * 1024 });
    await control.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    let status = '';
    for (;;) {
      status = ((await control.execute('query-migrate')) as { status?: string }).status ?? '';
      if (status === 'completed' || status === 'failed' || status === 'cancelled') break;
      await new Promise((r) => setTimeout(r, 200));
    }
    const info = (await control.execute('query-migrate')) as Record<string, unknown>;
    control.close();
    t.is(status, 'completed', `migration: ${JSON.stringify(info)}\nsource stderr: ${src.stderr}\ndestination stderr: ${dst.stderr}`);
    // The switch came while the guest was reading: the source never saw the end of the reads.
    t.false(src.lines.some((l) => /VHOSTD-MARK reading=done/.test(l)), 'the migration finished before the guest stopped reading');
    src.kill();
    t.is(await dst.waitLine(/VHOSTD-MARK stale=/, 200_000), 'VHOSTD-MARK stale=0', 'pages the daemon read into guest memory during the migration reached the destination');
    const bad = await dst.waitLine(/VHOSTD-MARK bad=/, 200_000);
    t.is(bad, 'VHOSTD-MARK bad=0', 'every chunk reads back in the guest after the switch');
    t.true(dst.lines.some((l) => /VHOSTD-MARK writing=done/.test(l)), 'the guest finished its writes on the destination');
    const disk = fs.readFileSync(file);
    let mismatched = 0;
    for (let i = 0; i < CHUNKS; i++) {
      const want = createHash('md5').update(chunk(i)).digest('hex');
      const got = createHash('md5').update(disk.subarray(i * CHUNK, (i + 1) * CHUNK)).digest('hex');
      if (want !== got) mismatched++;
    }
    t.is(mismatched, 0, 'every chunk is in the host image');
    t.regex(source.stderr(), /dirty page log: \d+ bytes/, 'QEMU gave the source daemon its dirty page log');
  } finally {
    src.kill();
    dst.kill();
    await source.stop();
    await destination.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
