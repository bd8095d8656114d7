/**
 * The layering of lib/ (lib/ARCHITECTURE.md: imports point down only) as `npm run lint` enforces it:
 * eslint.config.js run through ESLint's Node API on one-line files placed in each layer. Every
 * forbidden import must be an error and every allowed one clean, including where one layer's rules
 * overlap another's (lib/virtqueue is also in lib/).
 */
import path from 'node:path';

import test from 'ava';
import { ESLint } from 'eslint';

import { repoRoot } from '../helpers/guest-image';

/** The rule that reports a forbidden import (ESLint's, or typescript-eslint's that knows `import type`). */
const RULES = new Set(['no-restricted-imports', '@typescript-eslint/no-restricted-imports']);

interface Case {
  /** The importing file, from the repository root. */
  readonly file: string;
  /** The import statement. */
  readonly code: string;
  readonly forbidden: boolean;
}

const forbidden = (file: string, code: string): Case => ({ file, code, forbidden: true });
const allowed = (file: string, code: string): Case => ({ file, code, forbidden: false });

const CASES: readonly Case[] = [
  // native/: syscalls only.
  forbidden('native/index.ts', "import { ProtocolError } from '../lib/errors';"),
  forbidden('native/index.ts', "import { RngDevice } from '../daemons/rng/device';"),
  allowed('native/index.ts', "import { MAP_VIEW_STRIDE } from './layout';"),
  // Every layer of lib/: no device.
  ...['cli', 'runtime', 'metrics', 'systemd', 'control', 'vhost-user', 'virtqueue', 'memory', 'io', 'virtio'].map((dir) =>
    forbidden(`lib/${dir}/x.ts`, "import { RngDevice } from '../../daemons/rng/device';"),
  ),
  allowed('lib/cli/x.ts', "import { serve } from '../runtime/serve';"),
  // Runtime and its services: below the CLI.
  forbidden('lib/runtime/x.ts', "import { runDaemon } from '../cli/run-daemon';"),
  forbidden('lib/metrics/x.ts', "import { runDaemon } from '../cli/run-daemon';"),
  allowed('lib/runtime/x.ts', "import { Vring } from '../vhost-user/vring';"),
  allowed('lib/metrics/x.ts', "import type { Server } from '../runtime/serve';"),
  // The protocol: runtime types only, nothing above.
  allowed('lib/vhost-user/x.ts', "import type { Logger } from '../runtime/logger';"),
  forbidden('lib/vhost-user/x.ts', "import { silentLogger } from '../runtime/logger';"),
  forbidden('lib/vhost-user/x.ts', "import { serve } from '../runtime';"),
  forbidden('lib/vhost-user/x.ts', "import { createDaemonMetrics } from '../metrics/registry';"),
  forbidden('lib/vhost-user/x.ts', "import { notify } from '../systemd/notify';"),
  forbidden('lib/vhost-user/x.ts', "import { ControlServer } from '../control/server';"),
  allowed('lib/vhost-user/x.ts', "import { createVirtqueue } from '../virtqueue';"),
  allowed('lib/vhost-user/x.ts', "import { GuestMemory } from '../memory/guest-memory';"),
  // Rings and memory: no vhost-user, no runtime (not even types), nothing above.
  ...['virtqueue', 'memory'].flatMap((dir) => [
    forbidden(`lib/${dir}/x.ts`, "import { Request } from '../vhost-user/messages';"),
    forbidden(`lib/${dir}/x.ts`, "import type { Logger } from '../runtime/logger';"),
    forbidden(`lib/${dir}/x.ts`, "import { registry } from '../metrics/registry';"),
    forbidden(`lib/${dir}/x.ts`, "import { runDaemon } from '../cli/run-daemon';"),
    allowed(`lib/${dir}/x.ts`, "import { native } from '../../native';"),
  ]),
  forbidden('lib/memory/x.ts', "import { createVirtqueue } from '../virtqueue';"),
  allowed('lib/virtqueue/x.ts', "import { GuestMemory } from '../memory/guest-memory';"),
  // lib/io: files and io_uring on native/ only; it may name the Logger type it is handed.
  ...['vhost-user/messages', 'runtime/logger', 'virtqueue', 'memory/guest-memory', 'virtio/constants', 'control/server', 'cli/run-daemon'].map((target) =>
    forbidden('lib/io/x.ts', `import { x } from '../${target}';`),
  ),
  allowed('lib/io/x.ts', "import type { Logger } from '../runtime/logger';"),
  allowed('lib/io/x.ts', "import { native } from '../../native';"),
  allowed('lib/io/x.ts', "import { ConfigError } from '../errors';"),
  // Devices and tests sit on top.
  allowed('daemons/rng/x.ts', "import { serve } from '../../lib/runtime/serve';"),
  allowed('test/x.ts', "import { RngDevice } from '../daemons/rng/device';"),
];

const eslint = new ESLint({ cwd: repoRoot() });

for (const c of CASES) {
  test(`${c.file}: ${c.code} is ${c.forbidden ? 'an error' : 'allowed'}`, async (t) => {
    // A use of the import, so that no other rule (unused variables) has anything to say.
    const code = `${c.code}\nexport const used = [${/\{ (\w+) \}/.exec(c.code)![1]}];\n`;
    const [result] = await eslint.lintText(code, { filePath: path.join(repoRoot(), c.file) });
    const layering = result!.messages.filter((m) => RULES.has(m.ruleId ?? ''));
    t.is(layering.length, c.forbidden ? 1 : 0, layering.map((m) => m.message).join('; '));
    // Nothing else: a parse error or a rule that was switched off would hide a layering message.
    t.deepEqual(
      result!.messages.filter((m) => !RULES.has(m.ruleId ?? '')).map((m) => `${m.ruleId}: ${m.message}`),
      [],
    );
  });
}
