/**
 * Listening unix sockets that only the intended users can connect to. connect(2) on a unix socket
 * needs write permission on its file, which bind(2) creates with the mode `0777 & ~umask`: the
 * process umask is narrowed to 0177 around the bind, so the file is 0600 from its first instant,
 * and only then widened to 0660 with the `--socket-group` group (virtiofsd's option), which lets a
 * front-end running as another user (libvirt's qemu user) in.
 */
import fs from 'node:fs';

import { native } from '../../native';
import { ConfigError } from '../errors';

/** Owner read/write only, as a umask: what bind(2) leaves for the socket file. */
const OWNER_ONLY_UMASK = 0o177;

/**
 * Listen on `path` (a stale socket file there is replaced) with mode 0600, or 0660 owned by group
 * `group` (a gid). Returns the non-blocking listening fd. Throws ConfigError when the socket cannot
 * be created or given to the group (not a member, no such gid).
 */
export function listenPrivateUnixSocket(path: string, backlog: number, group?: number): number {
  // process.umask(mask) is per process and only allowed on the main thread; nothing runs between
  // the two calls (both synchronous), so no other file is created with this mask.
  const previous = process.umask(OWNER_ONLY_UMASK);
  let fd: number;
  try {
    fd = native.listenUnix(path, backlog);
  } catch (err) {
    throw new ConfigError('CONFIG_INVALID', `cannot listen on ${path}: ${(err as Error).message}`);
  } finally {
    process.umask(previous);
  }
  if (group !== undefined) {
    try {
      fs.chownSync(path, -1, group);
      fs.chmodSync(path, 0o660);
    } catch (err) {
      native.close(fd);
      fs.rmSync(path, { force: true });
      throw new ConfigError('CONFIG_INVALID', `cannot give ${path} to group ${group}: ${(err as Error).message}`);
    }
  }
  return fd;
}
