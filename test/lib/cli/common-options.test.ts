import test from 'ava';

import { parseListenAddress, toCommonConfig } from '../../../lib/cli/common-options';
import { ConfigError } from '../../../lib/errors';

test('--socket-path alone is a listening config', (t) => {
  const config = toCommonConfig({ 'socket-path': '/run/x.sock', 'log-level': 'info' }, {});
  t.is(config.socketPath, '/run/x.sock');
  t.is(config.fd, undefined);
});

test('socket activation stands in for --fd when no socket option is given', (t) => {
  const env: NodeJS.ProcessEnv = { LISTEN_PID: String(process.pid), LISTEN_FDS: '1' };
  t.is(toCommonConfig({ 'log-level': 'info' }, env).fd, 3);
  t.is(env.LISTEN_FDS, undefined, 'the variables are consumed');
});

test('LISTEN_FDS for another process is ignored', (t) => {
  const err = t.throws(() => toCommonConfig({ 'log-level': 'info' }, { LISTEN_PID: '1', LISTEN_FDS: '1' }), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_MISSING');
});

test('two socket options conflict', (t) => {
  const err = t.throws(() => toCommonConfig({ 'socket-path': '/a', connect: '/b', 'log-level': 'info' }, {}), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_CONFLICT');
});

test('--metrics accepts PORT, HOST:PORT and [IPv6]:PORT', (t) => {
  t.deepEqual(parseListenAddress('9100'), { host: '127.0.0.1', port: 9100 });
  t.deepEqual(parseListenAddress('0.0.0.0:9100'), { host: '0.0.0.0', port: 9100 });
  t.deepEqual(parseListenAddress('[::1]:9100'), { host: '::1', port: 9100 });
  t.throws(() => parseListenAddress('localhost'), { instanceOf: ConfigError });
  t.throws(() => parseListenAddress('70000'), { instanceOf: ConfigError });
});
