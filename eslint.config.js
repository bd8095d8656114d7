// Lint rules, including the layering of lib/: imports point down only (lib/ARCHITECTURE.md).
const js = require('@eslint/js');
const tseslint = require('typescript-eslint');

// A directory that must not be imported, with why. `typeOnly` allows `import type` (names, no code).
// Both patterns: `../runtime` (an index import) and `../runtime/serve`.
const forbid = (dir, message, typeOnly = false) => ({ group: [`**/${dir}`, `**/${dir}/**`], message, allowTypeImports: typeOnly });

const devices = forbid('daemons', 'lib/ knows nothing of any device');
// What sits above a layer, from the top: the CLI, then runtime, metrics, systemd and the control socket.
const cli = forbid('cli', 'only a daemon runs the CLI');
const services = (runtimeTypes = false) => [
  forbid('runtime', `the protocol, rings and memory sit below the runtime${runtimeTypes ? ': type imports only' : ''}`, runtimeTypes),
  ...['metrics', 'systemd', 'control'].map((dir) => forbid(dir, 'the protocol, rings and memory sit below the runtime and its services')),
];
const protocol = forbid('vhost-user', 'rings, memory and io know nothing of vhost-user');

// Each layer's full list. The lists must be whole: ESLint applies one rule's options from the LAST
// config block matching a file, so a block for lib/virtqueue replaces the one for lib/ entirely.
const layers = [
  { files: ['native/**/*.ts'], forbidden: [forbid('lib', 'native/ is syscalls only'), forbid('daemons', 'native/ is syscalls only')] },
  { files: ['lib/**/*.ts'], forbidden: [devices] },
  { files: ['lib/runtime/**/*.ts', 'lib/metrics/**/*.ts', 'lib/systemd/**/*.ts', 'lib/control/**/*.ts'], forbidden: [devices, cli] },
  {
    // The protocol layer may name runtime types (Logger, the worker pool it is handed), never run its code.
    files: ['lib/vhost-user/**/*.ts'],
    forbidden: [devices, cli, ...services(true)],
  },
  { files: ['lib/virtqueue/**/*.ts'], forbidden: [devices, cli, ...services(), protocol] },
  { files: ['lib/memory/**/*.ts'], forbidden: [devices, cli, ...services(), protocol, forbid('virtqueue', 'guest memory sits below the rings')] },
  {
    // Files and io_uring: on native only (it may name the Logger type), so every layer above may use it.
    files: ['lib/io/**/*.ts'],
    forbidden: [devices, cli, ...services(true), protocol, ...['virtqueue', 'memory', 'virtio'].map((dir) => forbid(dir, 'lib/io knows files and io_uring, nothing of virtio'))],
  },
];

module.exports = tseslint.config(
  { ignores: ['build/**', 'node_modules/**', 'native/build/**', 'eslint.config.js'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
      '@typescript-eslint/no-non-null-assertion': 'off',
      eqeqeq: 'error',
    },
  },
  ...layers.map(({ files, forbidden }) => ({
    files,
    rules: { '@typescript-eslint/no-restricted-imports': ['error', { patterns: forbidden }] },
  })),
);
