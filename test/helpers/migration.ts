/**
 * Live migration on one host, as an operator runs it: a source QEMU and a destination QEMU
 * (`-incoming defer`, then `migrate-incoming` on a unix socket), each with its own vhost-user daemon(s),
 * both booted from the same initramfs; `migrate` over QMP; the guest carries on on the destination. The
 * test decides what the daemons serve (the same image, the same or another TAP) and what the guest does.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { RunningDaemon } from './daemon';
import { GUEST_LIBRARY_PATH, GUEST_SCRIPT_PATH, guestImage, writeTestInitrd, type GuestFile } from './guest-image';
import { GUEST_LIBRARY, QemuProcess, qemuArgs } from './qemu-guest';
import { QmpClient } from './qmp';

export type MigrationSide = 'source' | 'destination';

export interface LiveMigrationOptions {
  /** The guest's test script (busybox sh, with the guest library), as for runGuest. */
  readonly script: string;
  readonly files?: readonly GuestFile[];
  /** Appended to the kernel command line. */
  readonly append?: string;
  readonly memory?: string;
  /** Start `side`'s daemon (the source's first). */
  startDaemon(side: MigrationSide): Promise<RunningDaemon>;
  /** The QEMU arguments that give the guest its device(s) on `side`, served by `daemon`. */
  deviceArgs(daemon: RunningDaemon, side: MigrationSide): string[];
}

/** One QEMU with its daemon and QMP connection. */
export interface MigrationHost {
  readonly daemon: RunningDaemon;
  readonly qemu: QemuProcess;
  readonly qmp: QmpClient;
}

/** What a completed migration took, from QEMU's `query-migrate` and the host clock. */
export interface MigrationTimings {
  /** query-migrate `total-time`: from `migrate` to completion. */
  readonly totalMs: number;
  /** query-migrate `downtime`: the guest was stopped this long. */
  readonly downtimeMs: number;
  /** query-migrate `setup-time`. */
  readonly setupMs: number;
  /** Host clock from the source's STOP event to the destination's RESUME event. */
  readonly stopToResumeMs: number;
  /** query-migrate `ram.transferred`. */
  readonly ramBytes: number;
}

export class LiveMigration {
  private constructor(
    readonly source: MigrationHost,
    readonly destination: MigrationHost,
    private readonly dir: string,
  ) {}

  /** Start both daemons and both QEMUs; the source boots, the destination waits for the stream. */
  static async start(options: LiveMigrationOptions): Promise<LiveMigration> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-migration-${process.pid}-`));
    const daemons: RunningDaemon[] = [];
    const qemus: QemuProcess[] = [];
    try {
      const image = await guestImage();
      const initrd = path.join(dir, 'initrd.img');
      await writeTestInitrd(image, initrd, [
        { path: GUEST_LIBRARY_PATH, data: GUEST_LIBRARY },
        { path: GUEST_SCRIPT_PATH, data: `. ${GUEST_LIBRARY_PATH}\n${options.script}\n`, mode: 0o755 },
        ...(options.files ?? []),
      ]);
      const host = async (side: MigrationSide): Promise<MigrationHost> => {
        const daemon = await options.startDaemon(side);
        daemons.push(daemon);
        const qmpPath = path.join(dir, `${side}.qmp`);
        const args = qemuArgs(image, initrd, {
          append: options.append,
          memory: options.memory,
          qemuArgs: [
            ...options.deviceArgs(daemon, side),
            '-qmp', `unix:${qmpPath},server=on,wait=off`,
            ...(side === 'destination' ? ['-incoming', 'defer'] : []),
          ],
        });
        const qemu = new QemuProcess(args, side);
        qemus.push(qemu);
        const qmp = await QmpClient.connect(qmpPath);
        await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
        return { daemon, qemu, qmp };
      };
      const source = await host('source');
      const destination = await host('destination');
      return new LiveMigration(source, destination, dir);
    } catch (err) {
      for (const qemu of qemus) await qemu.kill();
      for (const daemon of daemons) await daemon.stop();
      fs.rmSync(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * Migrate the running source to the destination over a unix socket and wait until the destination
   * runs the guest. `parameters` go to `migrate-set-parameters` first (e.g. `max-bandwidth`). Throws,
   * with both QEMUs' stderr, when the migration fails.
   */
  async migrate(parameters?: Record<string, unknown>, timeoutMs = 240_000): Promise<MigrationTimings> {
    const uri = `unix:${path.join(this.dir, 'migration.sock')}`;
    const { source, destination } = this;
    await destination.qmp.execute('migrate-incoming', { uri });
    if (parameters !== undefined) await source.qmp.execute('migrate-set-parameters', parameters);
    await source.qmp.execute('migrate', { uri });
    const end = await source.qmp.waitEvent('MIGRATION', (d) => ['completed', 'failed', 'cancelled'].includes(String(d.status)), timeoutMs);
    const info = (await source.qmp.execute('query-migrate')) as Record<string, unknown>;
    if (end.data.status !== 'completed') {
      throw new Error(`migration ${String(end.data.status)}: ${JSON.stringify(info)}\nsource: ${source.qemu.stderr}\ndestination: ${destination.qemu.stderr}`);
    }
    const resumed = await destination.qmp.waitEvent('RESUME', undefined, timeoutMs);
    const stopped = await source.qmp.waitEvent('STOP', undefined, 0);
    const ram = (info.ram ?? {}) as Record<string, unknown>;
    return {
      totalMs: Number(info['total-time']),
      downtimeMs: Number(info.downtime),
      setupMs: Number(info['setup-time']),
      stopToResumeMs: resumed.receivedAt - stopped.receivedAt,
      ramBytes: Number(ram.transferred),
    };
  }

  /** Kill both QEMUs, stop both daemons (SIGTERM), remove the temp directory. */
  async close(): Promise<void> {
    for (const host of [this.source, this.destination]) {
      host.qmp.close();
      await host.qemu.kill();
    }
    for (const host of [this.source, this.destination]) await host.daemon.stop();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
