import test from 'ava';

import { packedNeedEvent, vringNeedEvent } from '../../../lib/virtqueue/notify';
import {
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE,
  VRING_USED_F_NO_NOTIFY,
} from '../../../lib/virtio/constants';
import { R0_DATA, drain, packedSetup, splitSetup } from './setup';

test('vring_need_event: the event index must lie in [old, new) modulo 2^16', (t) => {
  const rows: [event: number, next: number, old: number, expected: boolean][] = [
    [0, 1, 0, true],
    [1, 1, 0, false],
    [5, 10, 3, true],
    [3, 10, 3, true],
    [9, 10, 3, true],
    [10, 10, 3, false],
    [2, 10, 3, false],
    [0xffff, 1, 0xfffe, true],
    [0, 1, 0xfffe, true],
    [1, 1, 0xfffe, false],
    [7, 7, 7, false],
  ];
  for (const [event, next, old, expected] of rows) t.is(vringNeedEvent(event, next, old), expected, `${event} ${next} ${old}`);
});

test('packed need_event unwraps positions and the event wrap counter', (t) => {
  // Ring of 8: the batch went from position 6 (wrap 1) to 2 (wrap 0).
  t.true(packedNeedEvent(7 | (1 << 15), 8, 6, 2, 0), 'previous lap, inside the batch');
  t.false(packedNeedEvent(5 | (1 << 15), 8, 6, 2, 0), 'previous lap, before the batch');
  t.true(packedNeedEvent(1, 8, 6, 2, 0), 'this lap, inside');
  t.false(packedNeedEvent(2, 8, 6, 2, 0), 'this lap, not yet');
  t.true(packedNeedEvent(4 | (1 << 15), 8, 3, 5, 1), 'no wrap');
  t.false(packedNeedEvent(5 | (1 << 15), 8, 3, 5, 1), 'no wrap, not yet');
});

test('split EVENT_IDX: one notification per flush, none until used_event is passed', (t) => {
  const { driver, queue, notified } = splitSetup({ size: 16, eventIdx: true });
  const complete = (n: number): number => {
    for (let i = 0; i < n; i++) driver.addChain([{ addr: R0_DATA, len: 4, writable: true }]);
    driver.publish();
    for (const c of drain(queue)) queue.pushUsed(c, 4);
    const published = queue.flush();
    driver.takeUsed();
    return published;
  };
  t.is(complete(4), 4);
  t.is(notified.count, 1, 'four used elements, one notification');
  driver.setUsedEvent(6); // notify once used.idx passes 6 (the element at index 6 is written)
  complete(1); // used.idx 5
  complete(1); // 6
  t.is(notified.count, 1);
  complete(1); // 7: index 6 was written
  t.is(notified.count, 2);
  driver.setUsedEvent(8);
  complete(3); // 7 -> 10 crosses 8 in one batch
  t.is(notified.count, 3);
  complete(2); // used_event stays behind: no more
  t.is(notified.count, 3);
  t.is(queue.counters.notifications, 3);
  t.is(queue.counters.batches, 6);
  t.is(queue.flush(), 0, 'an empty flush publishes nothing');
  t.is(notified.count, 3);
});

test('split EVENT_IDX: enableNotification sets avail_event and catches the lost-kick race', (t) => {
  const { driver, queue } = splitSetup({ eventIdx: true });
  driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.publish();
  queue.disableNotification();
  t.is(driver.usedFlags(), 0, 'with EVENT_IDX the device keeps used.flags at 0 (§2.7.10)');
  for (const c of drain(queue)) queue.pushUsed(c, 0);
  queue.flush();
  // The driver adds a chain while the device is between its last pop and re-enabling: it saw a stale
  // avail_event and did not kick.
  driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.publish();
  t.true(queue.enableNotification());
  t.is(driver.availEvent(), 1);
  for (const c of drain(queue)) queue.pushUsed(c, 0);
  queue.flush();
  t.false(queue.enableNotification());
  t.is(driver.availEvent(), 2);
});

test('split without EVENT_IDX: NO_INTERRUPT suppresses notifications; NO_NOTIFY follows disable/enable', (t) => {
  const { driver, queue, notified } = splitSetup();
  const once = (): void => {
    driver.addChain([{ addr: R0_DATA, len: 4 }]);
    driver.publish();
    for (const c of drain(queue)) queue.pushUsed(c, 0);
    queue.flush();
  };
  once();
  t.is(notified.count, 1);
  driver.setAvailFlags(VRING_AVAIL_F_NO_INTERRUPT);
  once();
  once();
  t.is(notified.count, 1);
  driver.setAvailFlags(0);
  once();
  t.is(notified.count, 2);

  queue.disableNotification();
  t.is(driver.usedFlags(), VRING_USED_F_NO_NOTIFY);
  t.false(queue.enableNotification());
  t.is(driver.usedFlags(), 0);
  queue.disableNotification();
  driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.publish();
  t.true(queue.enableNotification());
});

test('packed: driver event DISABLE / ENABLE decide notifications, once per flush', (t) => {
  const { driver, queue, notified } = packedSetup();
  const complete = (n: number): void => {
    for (let i = 0; i < n; i++) driver.addChain([{ addr: R0_DATA, len: 4 }]);
    driver.publish();
    for (const c of drain(queue)) queue.pushUsed(c, 0);
    queue.flush();
    driver.takeUsed();
  };
  complete(3);
  t.is(notified.count, 1);
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DISABLE);
  complete(2);
  t.is(notified.count, 1);
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_ENABLE);
  complete(5);
  t.is(notified.count, 2);
  // DESC without EVENT_IDX negotiated is not valid (§2.8.10): treated as ENABLE.
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 0, 0);
  complete(1);
  t.is(notified.count, 3);
});

test('packed EVENT_IDX: DESC events fire only when the named descriptor is used, across a wrap', (t) => {
  const { driver, queue, notified } = packedSetup({ size: 8, eventIdx: true });
  const complete = (n: number): void => {
    for (let i = 0; i < n; i++) driver.addChain([{ addr: R0_DATA, len: 4 }]);
    driver.publish();
    for (const c of drain(queue)) queue.pushUsed(c, 0);
    queue.flush();
    driver.takeUsed();
  };
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 4, 1);
  complete(2); // first decision always notifies; used position 2, wrap 1
  t.is(notified.count, 1);
  complete(1); // 3
  complete(1); // 4
  t.is(notified.count, 1);
  complete(1); // 5: the descriptor at 4 was used
  t.is(notified.count, 2);
  driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, 1, 0); // position 1 of the next lap
  complete(4); // 5 -> 1 (wrap 0): position 1 of the new lap not used yet
  t.is(notified.count, 2);
  complete(1); // 1 -> 2
  t.is(notified.count, 3);
});

test('packed: enable/disable write the device event structure and catch the race', (t) => {
  const plain = packedSetup();
  plain.queue.disableNotification();
  t.is(plain.driver.deviceEvent().flags, VRING_PACKED_EVENT_FLAG_DISABLE);
  t.false(plain.queue.enableNotification());
  t.is(plain.driver.deviceEvent().flags, VRING_PACKED_EVENT_FLAG_ENABLE);

  const { driver, queue } = packedSetup({ size: 4, eventIdx: true });
  for (let round = 0; round < 3; round++) {
    driver.addChain([{ addr: R0_DATA, len: 4 }]);
    driver.addChain([{ addr: R0_DATA, len: 4 }]);
    driver.publish();
    queue.disableNotification();
    for (const c of drain(queue)) queue.pushUsed(c, 0);
    queue.flush();
    driver.takeUsed();
    t.false(queue.enableNotification());
    t.deepEqual(driver.deviceEvent(), { offset: driver.nextAvail, wrap: driver.availWrap, flags: VRING_PACKED_EVENT_FLAG_DESC });
  }
  queue.disableNotification();
  driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.publish();
  t.true(queue.enableNotification(), 'a descriptor made available meanwhile is reported');
});
