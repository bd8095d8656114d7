/**
 * sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (the native helper sends it, Node
 * has no unix datagram sockets). Does nothing when not started by systemd.
 */
import { native } from '../../native';

export function sdNotify(state: string): boolean {
  const socket = process.env.NOTIFY_SOCKET;
  if (socket === undefined || socket === '') return false;
  native.sdNotify(socket, state);
  return true;
}

/**
 * When systemd set WATCHDOG_USEC for us, ping at half the interval (sd_watchdog_enabled(3)).
 * The timer is unref'ed and stops with the returned function. A stuck event loop stops the pings,
 * which is the point.
 */
export function startWatchdog(): () => void {
  const usec = Number(process.env.WATCHDOG_USEC);
  const pid = process.env.WATCHDOG_PID;
  if (!Number.isFinite(usec) || usec <= 0 || (pid !== undefined && Number(pid) !== process.pid)) return () => {};
  const timer = setInterval(() => sdNotify('WATCHDOG=1'), Math.max(1, Math.floor(usec / 2000)));
  timer.unref();
  return () => clearInterval(timer);
}
