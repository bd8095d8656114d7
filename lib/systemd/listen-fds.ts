/**
 * sd_listen_fds_with_names(3): sockets passed by systemd socket activation start at fd 3, and
 * LISTEN_FDNAMES names them, colon-separated, in order (a socket unit's FileDescriptorName=, by default
 * the unit's name; "unknown" when the variable is missing, as libsystemd does). The variables are
 * removed afterwards so that children do not take them for theirs.
 */
export const SD_LISTEN_FDS_START = 3;

export interface ListenFd {
  fd: number;
  name: string;
}

export function listenFds(env: NodeJS.ProcessEnv = process.env): ListenFd[] {
  const pid = Number(env.LISTEN_PID);
  const count = Number(env.LISTEN_FDS);
  const names = env.LISTEN_FDNAMES?.split(':') ?? [];
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (pid !== process.pid || !Number.isInteger(count) || count <= 0) return [];
  return Array.from({ length: count }, (_, i) => ({ fd: SD_LISTEN_FDS_START + i, name: names[i] || 'unknown' }));
}
