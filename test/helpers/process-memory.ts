/**
 * Resident memory of a process without V8's heap pages. V8 sizes its heap to the work done (it
 * doubles the young generation once as many bytes as it holds have survived scavenges, shrinks it
 * when idle, and keeps freed pages in a pool), which moves RSS by up to 8 MiB either way within a run
 * without anything being kept, more when other tests load the machine. What a connection leaves
 * behind outside the heap (native memory per request, a mapping, a handle per kick) shows in
 * {@link rssOutsideV8}; JS objects kept alive show in the fd, mapping and heap checks of each test.
 */
import fs from 'node:fs';

/** VmRSS of process `pid`, in bytes. */
export function rss(pid: number | 'self' = 'self'): number {
  const kib = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (kib === null) throw new Error(`no VmRSS for ${pid}`);
  return Number(kib[1]) * 1024;
}

/**
 * The resident bytes of V8's heap pages in process `pid`. V8 (Node 20) maps each regular heap page,
 * pooled ones included, as its own anonymous mapping of 256 KiB (Page::kPageSize) aligned to its
 * size; nothing else in the process is mapped that way.
 */
export function v8PagesRss(pid: number | 'self' = 'self'): number {
  let total = 0;
  let v8 = false;
  for (const line of fs.readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)\s*(.*)$/.exec(line);
    if (m !== null) {
      const start = parseInt(m[1]!, 16);
      const end = parseInt(m[2]!, 16);
      v8 = m[3] === '0' && m[4] === '' && start % (256 * 1024) === 0 && end - start === 256 * 1024;
      continue;
    }
    const r = /^Rss:\s+(\d+) kB/.exec(line);
    if (r !== null && v8) total += Number(r[1]) * 1024;
  }
  return total;
}

/** RSS of `pid` outside V8's heap pages, in bytes. */
export function rssOutsideV8(pid: number | 'self' = 'self'): number {
  return rss(pid) - v8PagesRss(pid);
}
