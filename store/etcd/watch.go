package etcd

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

// The read caches of every replica are driven by a watch of the prefix:
// a change committed on any replica drops what it names once the watch
// delivers it (on loopback, milliseconds). How fresh that is, is measured:
// every HeartbeatInterval each replica writes its heartbeat key (P
// lead/hb/<writer>, under a lease) inside the watched range, and notes on
// the monotonic clock when it sent it. The watch delivers events in
// revision order, so when the heartbeat's own event arrives, every change
// acknowledged before the heartbeat was sent has arrived before it:
// FreshWithin(d) holds while the newest heartbeat seen back was sent
// within d. The service serves cached records only while it holds
// (kms.Freshness, StaleBound 1 s), and reads from etcd otherwise: a
// replica paused (SIGSTOP), cut off from etcd or slow serves nothing
// older than the bound. (etcd's own progress notices are not used: etcd
// 3.4 may send one ahead of events an unsynced watcher has not been sent
// yet.)
//
// Besides, if the watch has heard nothing for StaleAfter, or it ends
// (compaction, no leader), every watcher is told to drop everything
// (kms.Change{All: true}), again at every ProgressInterval until the
// watch is back.
var (
	ProgressInterval  = 500 * time.Millisecond
	StaleAfter        = 2 * time.Second
	HeartbeatInterval = 200 * time.Millisecond
)

// Bound is the longest the caches may lag: the service's StaleBound (its
// default, 1 s), which the heartbeats keep.
func Bound() time.Duration { return time.Second }

type watchHealth struct {
	heard  atomic.Int64 // unix ns of the last event or progress notice
	resets atomic.Uint64
	// fresh: when the newest heartbeat seen back by the watch was sent,
	// in ns since base (the monotonic clock); -1: none yet.
	base  time.Time
	fresh atomic.Int64
	hbMu  sync.Mutex
	sent  map[string]time.Duration // heartbeat value -> when it was sent (since base)
	beats atomic.Uint64
}

// FreshWithin implements kms.Freshness: every change committed more than
// d ago has reached the watchers.
func (s *Store) FreshWithin(d time.Duration) bool {
	f := s.health.fresh.Load()
	return f >= 0 && time.Since(s.health.base)-time.Duration(f) <= d
}

// Staleness is how far behind the caches may be: the time since the
// newest heartbeat seen back was sent (for metrics).
func (s *Store) Staleness() time.Duration {
	f := s.health.fresh.Load()
	if f < 0 {
		return time.Since(s.health.base)
	}
	return time.Since(s.health.base) - time.Duration(f)
}

// heartbeatK is this process's heartbeat key.
func (s *Store) heartbeatK() string { return s.p + "lead/hb/" + s.seal.writer }

// heartbeats writes this process's heartbeat every HeartbeatInterval until
// ctx ends, under a lease of its own, one at a time.
func (s *Store) heartbeats(ctx context.Context) {
	t := time.NewTicker(HeartbeatInterval)
	defer t.Stop()
	var lease clientv3.LeaseID
	for ctx.Err() == nil {
		if lease == 0 {
			gctx, cancel := s.ctx(ctx)
			g, err := s.cli.Grant(gctx, 10)
			cancel()
			if err == nil {
				if ka, err := s.cli.KeepAlive(ctx, g.ID); err == nil {
					lease = g.ID
					go func() {
						for range ka {
						}
					}()
				}
			}
		}
		if lease != 0 {
			// A random value names the heartbeat: one that is forged or
			// put back in etcd matches none this process is waiting for.
			b := make([]byte, 12)
			_, _ = crand.Read(b)
			nonce := hex.EncodeToString(b)
			sent := time.Since(s.health.base)
			s.health.hbMu.Lock()
			for n, at := range s.health.sent {
				if sent-at > 10*time.Second {
					delete(s.health.sent, n)
				}
			}
			s.health.sent[nonce] = sent
			s.health.hbMu.Unlock()
			pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_, err := s.cli.Put(pctx, s.heartbeatK(), nonce, clientv3.WithLease(lease))
			cancel()
			s.health.beats.Add(1)
			if err != nil && strings.Contains(err.Error(), "lease not found") {
				lease = 0
			}
		}
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
	if lease != 0 {
		rctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, _ = s.cli.Revoke(rctx, lease)
		cancel()
	}
}

// sawHeartbeat returns when the heartbeat of this process the watch
// delivered was sent (since base), or -1 if ev is none.
func (s *Store) sawHeartbeat(ev *clientv3.Event) time.Duration {
	if string(ev.Kv.Key) != s.heartbeatK() || ev.Type != clientv3.EventTypePut {
		return -1
	}
	s.health.hbMu.Lock()
	sent, ok := s.health.sent[string(ev.Kv.Value)]
	delete(s.health.sent, string(ev.Kv.Value))
	s.health.hbMu.Unlock()
	if !ok {
		return -1
	}
	return sent
}

// Resets counts how often the watchers were told to drop everything.
func (s *Store) Resets() uint64 { return s.health.resets.Load() }

// Watch implements kms.Store.
func (s *Store) Watch(fn func([]kms.Change)) { s.watchers.Watch(fn) }

// changed tells the watchers what a transaction wrote (its own, at commit;
// every replica's, from the watch).
func (s *Store) changed(chs []kms.Change) { s.watchers.Notify(chs) }

// noteOwn records the revision of a commit of this process.
func (s *Store) noteOwn(rev int64) {
	s.ownSet.Lock()
	s.own[rev] = true
	s.ownSet.Unlock()
}

// others drops the events of this process's own commits, and forgets the
// revisions at or below rev.
func (s *Store) others(evs []*clientv3.Event, rev int64) []*clientv3.Event {
	s.ownMu.Lock()
	defer s.ownMu.Unlock()
	out := evs[:0:0]
	for _, ev := range evs {
		if !s.own[ev.Kv.ModRevision] {
			out = append(out, ev)
		}
	}
	for r := range s.own {
		if r <= rev {
			delete(s.own, r)
		}
	}
	return out
}

func (s *Store) reset() {
	s.health.resets.Add(1)
	s.changed([]kms.Change{{All: true}})
}

// change names the record an etcd key holds, if the caches keep it.
func (s *Store) change(key string) (kms.Change, bool) {
	rest, ok := strings.CutPrefix(key, s.p)
	if !ok {
		return kms.Change{}, false
	}
	switch {
	case strings.HasPrefix(rest, "k/"):
		return kms.Change{Key: rest[2:]}, true
	case strings.HasPrefix(rest, "t/"):
		return kms.Change{Token: rest[2:]}, true
	case strings.HasPrefix(rest, "v/"):
		name, n, ok := strings.Cut(rest[2:], "/")
		v, err := strconv.ParseUint(n, 16, 64)
		if !ok || err != nil || v == 0 {
			return kms.Change{}, false
		}
		return kms.Change{Key: name, Version: v}, true
	}
	return kms.Change{}, false
}

// watch follows the prefix until Close.
func (s *Store) watch() {
	defer close(s.watched)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { <-s.quit; cancel() }()
	s.health.heard.Store(time.Now().UnixNano())
	go s.heartbeats(ctx)
	tick := time.NewTicker(ProgressInterval)
	defer tick.Stop()
	rev := s.watchFrom // the revision to watch from; 0: from now
	for ctx.Err() == nil {
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		// Only what the caches keep: keys, versions and tokens (k/ to v/;
		// lead/ and m/ between them change rarely). Not the audit log's
		// rows and pending groups, which are most of the writes, and which
		// every replica would otherwise receive.
		opts := []clientv3.OpOption{clientv3.WithRange(s.p + "w"), clientv3.WithProgressNotify(), clientv3.WithPrevKV()}
		if rev > 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		ch := s.cli.Watch(wctx, s.p+"k/", opts...)
		broken := false
		for !broken {
			select {
			case <-ctx.Done():
				wcancel()
				return
			case <-tick.C:
				if time.Since(time.Unix(0, s.health.heard.Load())) > StaleAfter {
					s.reset()
				}
				rctx, rcancel := context.WithTimeout(wctx, ProgressInterval)
				_ = s.cli.RequestProgress(rctx)
				rcancel()
			case resp, ok := <-ch:
				if !ok || resp.Err() != nil || resp.Canceled {
					if ok && resp.CompactRevision > 0 {
						// History gone: every cache is dropped (reset
						// below), and the watch goes on from the oldest
						// revision etcd keeps, so that a record loaded
						// again meanwhile (at a later revision) and changed
						// before the new watch starts is still heard of.
						rev = resp.CompactRevision
					}
					s.log.Warn("etcd watch ended; dropping cached records", "err", resp.Err())
					broken = true
					break
				}
				s.health.heard.Store(time.Now().UnixNano())
				if resp.Header.Revision > 0 {
					rev = resp.Header.Revision + 1
				}
				var chs []kms.Change
				beat := time.Duration(-1)
				for _, ev := range s.others(resp.Events, resp.Header.Revision) {
					beat = max(beat, s.sawHeartbeat(ev))
					s.checkEvent(ev)
					if c, ok := s.change(string(ev.Kv.Key)); ok {
						chs = append(chs, c)
					}
				}
				s.changed(chs)
				// Fresh as of a heartbeat only once the changes before it
				// (in this response too) have reached the caches.
				if beat >= 0 && int64(beat) > s.health.fresh.Load() {
					s.health.fresh.Store(int64(beat))
				}
			}
		}
		wcancel()
		s.reset()
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// checkEvent looks at a change another writer made to a watched record
// (keys, versions, tokens, metadata, digest shards) as it happens: kmsd
// never deletes those records, and every write of one counts one more
// than the value it replaced. A change that breaks either was made
// outside kmsd (an earlier value put back, a record deleted): the store
// is broken at once, as a failed scrub would break it, instead of at the
// next scrub. A value that fails its tag is refused when read (and by the
// scrub); it is only logged here.
func (s *Store) checkEvent(ev *clientv3.Event) {
	path := s.rel(string(ev.Kv.Key))
	if path == "m/"+storekit.RecordKeyMeta {
		// Written once, before any watch starts, and sealed again (the
		// same key) by a KEK rotation on another replica.
		if ev.Type == clientv3.EventTypePut && ev.Kv.CreateRevision == s.keyRev && s.sameRecordKey(ev.Kv.Value) {
			return
		}
		s.broke(path, "the record key was changed or deleted outside kmsd")
		return
	}
	if !strings.HasPrefix(path, "k/") && !strings.HasPrefix(path, "v/") && !strings.HasPrefix(path, "t/") &&
		!(strings.HasPrefix(path, "m/") && digestedOrShard(path)) {
		return
	}
	if ev.Type == clientv3.EventTypeDelete {
		s.broke(path, "deleted outside kmsd (kmsd never deletes it)")
		return
	}
	_, seq, err := s.auth.Open(path, ev.Kv.Value)
	if err != nil {
		s.log.Error("store: a record failed its check as it changed; it is refused when read", "record", path, "err", err)
		return
	}
	if ev.PrevKv == nil {
		return
	}
	if _, prev, err := s.auth.Open(path, ev.PrevKv.Value); err == nil && seq <= prev {
		s.broke(path, fmt.Sprintf("write %d replaced write %d: an earlier value was put back", seq, prev))
	}
}

// digestedOrShard: metadata records kmsd writes with counts (not the
// record key or the upgrade marker).
func digestedOrShard(path string) bool {
	return digested(path) || strings.HasPrefix(path, "m/d/")
}

func (s *Store) broke(path, reason string) {
	t := &kms.TamperError{Path: path, Reason: reason}
	s.auth.Tampered.Add(1)
	s.auth.Break(t)
	s.log.Error("STORE TAMPERED: a record kmsd keeps was changed outside kmsd; every record is refused until kmsd restarts on a store that passes (README: Storage trust)", "record", path, "reason", reason)
}
