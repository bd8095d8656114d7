import test from 'ava';

import { parseListenAddress, resolveGroup, toCommonConfig } from '../../../lib/cli/common-options';
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

test('socket activation: the socket named "control" is the control socket, the other the vhost-user one', (t) => {
  const env: NodeJS.ProcessEnv = { LISTEN_PID: String(process.pid), LISTEN_FDS: '2', LISTEN_FDNAMES: 'control:vhost-user' };
  const config = toCommonConfig({ 'log-level': 'info' }, env);
  t.is(config.controlFd, 3);
  t.is(config.fd, 4);
  t.is(env.LISTEN_FDNAMES, undefined, 'the variables are consumed');
});

test('socket activation without names: one socket is the vhost-user socket, two are refused', (t) => {
  const one = toCommonConfig({ 'log-level': 'info' }, { LISTEN_PID: String(process.pid), LISTEN_FDS: '1' });
  t.is(one.fd, 3);
  t.is(one.controlFd, undefined);
  const err = t.throws(() => toCommonConfig({ 'log-level': 'info' }, { LISTEN_PID: String(process.pid), LISTEN_FDS: '2' }), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_INVALID');
});

test('--control and --control-fd exclude each other; --control-fd must be an fd', (t) => {
  const both = t.throws(() => toCommonConfig({ 'socket-path': '/a', control: '/c', 'control-fd': 5, 'log-level': 'info' }, {}), { instanceOf: ConfigError });
  t.is(both?.code, 'CONFIG_CONFLICT');
  const negative = t.throws(() => toCommonConfig({ 'socket-path': '/a', 'control-fd': -1, 'log-level': 'info' }, {}), { instanceOf: ConfigError });
  t.is(negative?.code, 'CONFIG_INVALID');
  t.is(toCommonConfig({ 'socket-path': '/a', control: '/c', 'log-level': 'info' }, {}).controlPath, '/c');
  const same = t.throws(() => toCommonConfig({ 'socket-path': '/a', control: '/a', 'log-level': 'info' }, {}), { instanceOf: ConfigError });
  t.is(same?.code, 'CONFIG_CONFLICT');
});

test('--socket-group takes a group name or a gid', (t) => {
  t.is(resolveGroup('daemon'), 1);
  t.is(resolveGroup('4242'), 4242);
  const err = t.throws(() => resolveGroup('no-such-group-vhostd'), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_INVALID');
  t.is(toCommonConfig({ 'socket-path': '/a', 'socket-group': 'daemon', 'log-level': 'info' }, {}).socketGroup, 1);
});
