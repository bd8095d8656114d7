// Lint rules, including the layering of lib/: vhost-user -> virtqueue -> memory, io beside them, devices on top.
const js = require('@eslint/js');
const tseslint = require('typescript-eslint');

const layer = (files, forbidden, why) => ({
  files,
  rules: {
    'no-restricted-imports': ['error', { patterns: forbidden.map((group) => ({ group: [group], message: why })) }],
  },
});

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
  layer(['lib/**/*.ts'], ['**/daemons/**'], 'lib/ knows nothing of any device'),
  layer(['lib/virtqueue/**/*.ts', 'lib/memory/**/*.ts'], ['**/vhost-user/**', '**/runtime/**'], 'rings and memory know nothing of vhost-user'),
  layer(['native/**/*.ts'], ['**/lib/**', '**/daemons/**'], 'native/ is syscalls only'),
  {
    // The I/O engine knows files and io_uring: no virtio, no rings, no protocol; it may name the Logger type.
    files: ['lib/io/**/*.ts'],
    rules: {
      'no-restricted-imports': 'off',
      '@typescript-eslint/no-restricted-imports': [
        'error',
        {
          patterns: [
            { group: ['**/daemons/**'], message: 'lib/ knows nothing of any device' },
            {
              group: ['**/vhost-user/**', '**/virtqueue/**', '**/virtio/**', '**/memory/**', '**/cli/**', '**/metrics/**', '**/systemd/**'],
              message: 'lib/io knows files and io_uring, nothing of virtio or vhost-user',
            },
            { group: ['**/runtime/**'], message: 'lib/io sits below the runtime: type imports only', allowTypeImports: true },
          ],
        },
      ],
    },
  },
  {
    // The protocol layer may name runtime types (Logger, the worker pool it is handed), never run its code.
    files: ['lib/vhost-user/**/*.ts'],
    rules: {
      'no-restricted-imports': 'off',
      '@typescript-eslint/no-restricted-imports': [
        'error',
        {
          patterns: [
            { group: ['**/daemons/**'], message: 'lib/ knows nothing of any device' },
            { group: ['**/runtime/**'], message: 'the protocol layer sits below the runtime: type imports only', allowTypeImports: true },
          ],
        },
      ],
    },
  },
);
