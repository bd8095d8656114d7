/**
 * sd_listen_fds(3): sockets passed by systemd socket activation start at fd 3. The variables are
 * removed afterwards so that children do not take them for theirs.
 */
export const SD_LISTEN_FDS_START = 3;

export function listenFds(env: NodeJS.ProcessEnv = process.env): number[] {
  const pid = Number(env.LISTEN_PID);
  const count = Number(env.LISTEN_FDS);
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (pid !== process.pid || !Number.isInteger(count) || count <= 0) return [];
  return Array.from({ length: count }, (_, i) => SD_LISTEN_FDS_START + i);
}
