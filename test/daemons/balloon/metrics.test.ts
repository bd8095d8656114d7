/**
 * The balloon's `vhostd_balloon_*` metrics as an operator scrapes them: the device behind the real
 * protocol engine, inflate, deflate, hostile PFNs and a stats buffer driven by the test front-end,
 * then the registry the daemon serves (createDaemonMetrics) read as Prometheus text.
 */
import test from 'ava';

import { BalloonDevice, VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_STATS_VQ } from '../../../daemons/balloon/device';
import { chooseExecutor } from '../../../lib/io/choose-executor';
import { createDaemonMetrics } from '../../../lib/metrics/registry';
import { silentLogger } from '../../../lib/runtime/logger';
import { bit, VIRTIO_F_VERSION_1 } from '../../../lib/virtio/constants';
import { Scrape } from '../../helpers/scrape';
import { TestServer } from '../../lib/vhost-user/harness';

const PAGE = 4096;
const REGION1 = 0x80_0000;

function pfns(list: readonly number[]): Uint8Array {
  const bytes = new Uint8Array(list.length * 4);
  list.forEach((pfn, i) => new DataView(bytes.buffer).setUint32(4 * i, pfn, true));
  return bytes;
}

test('inflate, deflate, bad PFNs, guest stats and the target as metrics', async (t) => {
  const device = new BalloonDevice({
    targetPages: 1000,
    statsIntervalMs: 0,
    deflateOnOom: false,
    freePageReporting: false,
    queueSize: 64,
    createExecutor: chooseExecutor(silentLogger).create,
    logger: silentLogger,
  });
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  await fe.negotiate({ features: bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_MUST_TELL_HOST) | bit(VIRTIO_BALLOON_F_STATS_VQ) });
  await fe.setMemTable();
  for (let i = 0; i < 3; i++) await fe.setupQueue(i, 64);
  const base = REGION1 / PAGE;
  await fe.transfer(0, { readable: [{ data: pfns([base, base + 1, base + 2, base + 2, 0x40_0000 / PAGE]) }] }, 20_000);
  await fe.transfer(1, { readable: [{ data: pfns([base, base + 7]) }] }, 20_000);
  const stats = new Uint8Array(20);
  const view = new DataView(stats.buffer);
  view.setUint16(0, 5, true);
  view.setBigUint64(2, 512n << 20n, true);
  view.setUint16(10, 10, true);
  view.setBigUint64(12, 3n, true);
  fe.submit(2, { readable: [{ data: stats }] });
  for (let i = 0; i < 1000 && device.stats.statsUpdates === 0; i++) await new Promise((r) => setTimeout(r, 10));

  const scrape = await Scrape.of(createDaemonMetrics(ts.server));
  t.is(scrape.value('vhostd_balloon_target_pages', { device: 'balloon' }), 1000);
  t.is(scrape.value('vhostd_balloon_actual_pages'), 0);
  t.is(scrape.value('vhostd_balloon_pages'), 2);
  t.is(scrape.value('vhostd_balloon_partial_huge_pages'), 0, 'memfd memory has no huge pages');
  t.is(scrape.value('vhostd_balloon_unreleased_pages'), 0);
  t.is(scrape.value('vhostd_balloon_inflated_pages_total'), 3);
  t.is(scrape.value('vhostd_balloon_deflated_pages_total'), 1);
  t.is(scrape.value('vhostd_balloon_released_bytes_total', { source: 'inflate' }), 3 * PAGE);
  t.is(scrape.value('vhostd_balloon_released_bytes_total', { source: 'reporting' }), 0);
  t.is(scrape.value('vhostd_balloon_bad_pfns_total', { reason: 'repeated' }), 1);
  t.is(scrape.value('vhostd_balloon_bad_pfns_total', { reason: 'outside' }), 1);
  t.is(scrape.value('vhostd_balloon_bad_pfns_total', { reason: 'not-inflated' }), 1);
  t.is(scrape.value('vhostd_balloon_release_errors_total'), 0);
  t.is(scrape.value('vhostd_balloon_stats_updates_total'), 1);
  t.is(scrape.value('vhostd_balloon_guest_total_bytes'), 512 * 2 ** 20);
  t.is(scrape.value('vhostd_balloon_guest_oom_kills'), 3);
  t.is(scrape.value('vhostd_balloon_guest_free_bytes'), undefined, 'a statistic the guest never sent has no sample');
});
