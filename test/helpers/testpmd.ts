/**
 * DPDK's testpmd as a second vhost-user front-end: its virtio-user PMD (`--vdev net_virtio_user0,path=S`)
 * connects to a daemon's socket as QEMU would, with its own memory (memfd, `--no-huge`) and its own ring
 * code. Driven in interactive mode, one command at a time, as an operator types them.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

const PROMPT = 'testpmd> ';

/** Why testpmd cannot run here, or undefined when it can. */
export function testpmdMissingReason(): string | undefined {
  const run = spawnSync('dpdk-testpmd', ['--version'], { stdio: 'ignore' });
  return run.error === undefined ? undefined : 'dpdk-testpmd not found (scripts/install-deps.sh installs dpdk-dev and librte-net-virtio23)';
}

/** `show port stats`: what the PMD counted on the port since it started. */
export interface PortStats {
  rxPackets: number;
  rxBytes: number;
  txPackets: number;
  txBytes: number;
}

let instances = 0;

export class TestPmd {
  /**
   * Printed on stdout since the last prompt was consumed. Only stdout: the prompt comes in more than
   * one write, and a stderr message (e.g. "Error during enabling promiscuous mode") that arrives
   * between them would split it if both streams went into one buffer.
   */
  private output = '';
  /** Everything printed. */
  private transcript = '';
  private waiter: (() => void) | null = null;

  /** `runtimeDir`: EAL's directory for this `--file-prefix` (made even with `--no-shconf`), removed at exit. */
  private constructor(
    private readonly child: ChildProcess,
    runtimeDir: string,
  ) {
    child.stdout!.on('data', (chunk: Buffer) => {
      this.output += chunk.toString();
      this.transcript += chunk.toString();
      this.waiter?.();
    });
    child.stderr!.on('data', (chunk: Buffer) => {
      this.transcript += chunk.toString();
    });
    child.once('exit', () => {
      fs.rmSync(runtimeDir, { recursive: true, force: true });
      this.waiter?.();
    });
  }

  /**
   * Start testpmd with one virtio-user port of `queuePairs` queue pairs on `socketPath` (`vdevArgs`
   * appended to the `--vdev`, e.g. `,packed_vq=1`) and wait for its prompt. The port starts with testpmd, so the vhost-user session is
   * set up when this resolves. `--no-huge` with `--no-shconf`: no hugepages, no shared config file.
   */
  static async start(socketPath: string, vdevArgs: string, queuePairs = 1): Promise<TestPmd> {
    const prefix = `vhtpmd${process.pid}x${instances++}`;
    // stdbuf: testpmd writes its prompt straight to the fd but the rest through stdio, which a pipe
    // would buffer past the prompt.
    const child = spawn(
      'stdbuf',
      [
        '-oL', 'dpdk-testpmd',
        '-l', '0,1', '--no-pci', '--no-huge', '-m', '256', '--no-shconf', '--file-prefix', prefix,
        '--vdev', `net_virtio_user0,path=${socketPath},queues=${queuePairs}${vdevArgs}`,
        '--', '-i', '--total-num-mbufs=8192', '--disable-link-check', `--rxq=${queuePairs}`, `--txq=${queuePairs}`,
      ],
      { stdio: ['pipe', 'pipe', 'pipe'] },
    );
    const runtimeRoot = process.getuid?.() === 0 ? '/var/run' : (process.env['XDG_RUNTIME_DIR'] ?? '/tmp');
    const pmd = new TestPmd(child, path.join(runtimeRoot, 'dpdk', prefix));
    await pmd.untilPrompt();
    return pmd;
  }

  /** Everything testpmd printed so far (for failure messages). */
  log(): string {
    return this.transcript;
  }

  /** Run one interactive command and return what it printed before the next prompt. */
  async command(line: string): Promise<string> {
    this.output = '';
    this.child.stdin!.write(`${line}\n`);
    return this.untilPrompt();
  }

  async portStats(): Promise<PortStats> {
    const text = await this.command('show port stats 0');
    const field = (name: string): number => {
      const m = new RegExp(`${name}:\\s+(\\d+)`).exec(text);
      if (m === null) throw new Error(`no ${name} in testpmd's port stats:\n${text}`);
      return Number(m[1]);
    };
    return { rxPackets: field('RX-packets'), rxBytes: field('RX-bytes'), txPackets: field('TX-packets'), txBytes: field('TX-bytes') };
  }

  /** `quit` (stops and closes the port: the front-end hangs up) and wait for the exit status. */
  async quit(): Promise<number | null> {
    if (this.child.exitCode === null) this.child.stdin!.write('quit\n');
    return this.exited();
  }

  /** SIGKILL if still running (teardown after a failure). */
  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }

  private exited(): Promise<number | null> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return Promise.resolve(this.child.exitCode);
    return new Promise((resolve) => this.child.once('exit', (code) => resolve(code)));
  }

  /**
   * What testpmd printed up to its next prompt (a message it prints later, a link event say, stays for
   * `log()`). Throws when testpmd exits, or gives no prompt for 60 s, with everything it printed.
   */
  private async untilPrompt(): Promise<string> {
    const deadline = Date.now() + 60_000;
    for (;;) {
      const at = this.output.indexOf(PROMPT);
      if (at >= 0) {
        const text = this.output.slice(0, at);
        this.output = this.output.slice(at + PROMPT.length);
        return text;
      }
      if (this.child.exitCode !== null || this.child.signalCode !== null) {
        throw new Error(`dpdk-testpmd exited (${this.child.exitCode ?? this.child.signalCode}):\n${this.transcript}`);
      }
      if (Date.now() > deadline) throw new Error(`dpdk-testpmd gave no prompt in 60 s:\n${this.transcript}`);
      const timer = setTimeout(() => this.waiter?.(), 1000);
      await new Promise<void>((resolve) => (this.waiter = resolve));
      clearTimeout(timer);
      this.waiter = null;
    }
  }
}
