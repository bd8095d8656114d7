import test from 'ava';

import { createLogger } from '../../../lib/runtime/logger';

test('the level changes at run time: lines below it are dropped from then on', (t) => {
  const lines: string[] = [];
  const logger = createLogger({ level: 'warn', journal: false, write: (line) => lines.push(line) });
  logger.info('hidden');
  logger.warn('shown');
  t.is(logger.level, 'warn');
  logger.level = 'debug';
  logger.debug('now shown', { queue: 0 });
  logger.level = 'error';
  logger.warn('hidden again');
  logger.error('always');
  t.deepEqual(lines, ['warn: shown\n', 'debug: now shown queue=0\n', 'error: always\n']);
  t.is(logger.level, 'error');
});
