package etcd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

// Every record under the prefix is authenticated (storekit.Auth), its path
// being its etcd key without the prefix, except:
//
//	P ping, P lead/...                 no record (reads, elections)
//	P restoring                        no record: a restore is filling the
//	                                   prefix (dump.go)
//	P m/record-key                     the record key, sealed under the KEK
//	P m/upgrade                        set while records written before
//	                                   tags get theirs (upgradeLegacy)
//
// The store digest is kept in shards, one per process that writes
// (P m/d/<writer>): each transaction moves its own process's shard, so
// replicas never race each other for it, and the digest is the sum of the
// shards. A scrub reads every digested record and every shard at one
// revision. Audit rows (P a/r/) and checkpoints (P a/c/) carry tags but
// are not digested: the log's tree and signed checkpoints cover them, and
// they grow without end.

func (s *Store) recordKeyK() string { return s.metaK(storekit.RecordKeyMeta) }
func (s *Store) upgradeK() string   { return s.metaK("upgrade") }
func (s *Store) shardK(w string) string {
	return s.p + "m/d/" + w
}

// rel is an etcd key's path in the store.
func (s *Store) rel(key string) string { return strings.TrimPrefix(key, s.p) }

// digestedPrefixes are the ranges a scrub reads (all but the rows and the
// checkpoints), relative to the prefix.
var digestedPrefixes = []string{"a/end", "a/head", "a/pruned", "a/q/", "b/", "due/", "k/", "m/", "t/", "v/"}

// digested reports whether the record at path counts in the digest.
func digested(path string) bool {
	switch {
	case path == "ping", strings.HasPrefix(path, "lead/"), strings.HasPrefix(path, "a/r/"), strings.HasPrefix(path, "a/c/"),
		path == "m/"+storekit.RecordKeyMeta, path == "m/upgrade", strings.HasPrefix(path, "m/d/"):
		return false
	}
	return true
}

// shard is this process's part of the store digest.
type shard struct {
	mu  sync.Mutex // held from reading cur to the commit that moves it
	cur storekit.Digest
	seq uint64 // writes of the shard
	rev int64  // its mod revision (0: not written yet)
	// unresolved: a commit answered outcome-unknown (it may still apply);
	// it is settled before the next commit is sent.
	unresolved *pendingCommit
}

// pendingCommit is a commit of unknown outcome: it moves the shard from
// (seq, rev, cur) to seq+1 with digest next, or never applies.
type pendingCommit struct {
	seq       uint64
	rev       int64
	cur, next storekit.Digest
}

// wtx collects a transaction's compares and operations over authenticated
// records and the digest's move.
type wtx struct {
	s     *Store
	cmps  []clientv3.Cmp
	ops   []clientv3.Op
	delta storekit.Digest
	moved bool
	rev   int64 // the commit's revision, once it committed
}

func (s *Store) wtx() *wtx { return &wtx{s: s} }

// put writes body at key, which holds old (its stored form, nil if none).
func (w *wtx) put(key string, old, body []byte) error {
	var d storekit.Digest
	stored, err := w.s.auth.Put(&d, w.s.rel(key), old, body)
	if err != nil {
		return err
	}
	if digested(w.s.rel(key)) {
		w.delta.Plus(d)
		w.moved = true
	}
	w.ops = append(w.ops, clientv3.OpPut(key, string(stored)))
	return nil
}

// del deletes key, which holds old.
func (w *wtx) del(key string, old []byte) error {
	var d storekit.Digest
	if err := w.s.auth.Delete(&d, w.s.rel(key), old); err != nil {
		return err
	}
	if digested(w.s.rel(key)) {
		w.delta.Plus(d)
		w.moved = true
	}
	w.ops = append(w.ops, clientv3.OpDelete(key))
	return nil
}

// open checks a stored record and returns its body.
func (s *Store) open(key string, stored []byte) ([]byte, error) {
	body, _, err := s.auth.Open(s.rel(key), stored)
	return body, err
}

// index is the stored form of an index entry written once (seq 1): its
// old value when it is deleted is known without reading it.
func (s *Store) index(key string, body []byte) []byte {
	return s.auth.Seal(s.rel(key), 1, body)
}

// send commits w (with the shard's move, under its lock) and returns the
// response; ok false if a compare failed.
func (s *Store) send(ctx context.Context, w *wtx, orElse ...clientv3.Op) (resp *clientv3.TxnResponse, err error) {
	defer func() {
		if err == nil && resp.Succeeded {
			w.rev = resp.Header.Revision
		}
	}()
	cmps, ops := w.cmps, w.ops
	if w.moved {
		// A broken store still takes writes that read nothing (the
		// audit records of the requests it refuses); every other write
		// reads first, and the read is refused.
		s.shard.mu.Lock()
		defer s.shard.mu.Unlock()
		if u := s.shard.unresolved; u != nil {
			// Settled first: applied late, it moved the shard (and this
			// commit's compare would fail); not applied, it is fenced.
			if _, err := s.settle(ctx, *u, s.timeout); err != nil {
				// Not sent: this commit did not happen (not "unknown").
				return nil, fmt.Errorf("etcd: an earlier commit's outcome is still unknown (%v); this change was not sent", err)
			}
			s.shard.unresolved = nil
		}
		next := s.shard.cur
		next.Plus(w.delta)
		k := s.shardK(s.seal.writer)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k), "=", s.shard.rev))
		ops = append(ops, clientv3.OpPut(k, string(s.auth.Seal(s.rel(k), s.shard.seq+1, next.Bytes()))))
		resp, err := s.txn(ctx, cmps, ops, orElse)
		if err == nil && resp.Succeeded {
			s.shard.cur, s.shard.seq, s.shard.rev = next, s.shard.seq+1, resp.Header.Revision
			return resp, nil
		}
		if err != nil {
			return s.resolve(ctx, next, err)
		}
		if rerr := s.refreshShard(ctx); rerr != nil {
			return nil, rerr
		}
		return resp, nil
	}
	return s.txn(ctx, cmps, ops, orElse)
}

// ResolveBudget bounds how long a transaction whose outcome etcd did not
// say (a timeout, a leader change, a broken connection) is resolved
// before ErrOutcomeUnknown is returned.
var ResolveBudget = 10 * time.Second

// resolve finds whether a transaction whose call failed committed, within
// ResolveBudget: it is a commit from this process's shard as it is now to
// next (see settle). Past the budget it is remembered (the next commit
// settles it first) and ErrOutcomeUnknown is returned. Called with
// s.shard.mu held.
func (s *Store) resolve(ctx context.Context, next storekit.Digest, cause error) (*clientv3.TxnResponse, error) {
	u := pendingCommit{seq: s.shard.seq, rev: s.shard.rev, cur: s.shard.cur, next: next}
	committed, err := s.settle(ctx, u, ResolveBudget)
	switch {
	case errors.Is(err, kms.ErrOutcomeUnknown):
		s.shard.unresolved = &u
		return nil, fmt.Errorf("%w: %v", kms.ErrOutcomeUnknown, cause)
	case err != nil:
		return nil, err
	case committed:
		s.ownMu.RLock() // noteOwn's contract
		s.noteOwn(s.shard.rev)
		s.ownMu.RUnlock()
		return &clientv3.TxnResponse{Succeeded: true, Header: &etcdserverpb.ResponseHeader{Revision: s.shard.rev}}, nil
	case errors.Is(cause, rpctypes.ErrNoSpace):
		return nil, cause
	}
	return nil, fmt.Errorf("%w (it did not commit: fenced)", cause)
}

// settle finds whether commit u applied. It moved this process's shard
// from u.seq to u.seq+1 (to u.next), comparing the shard's revision, and
// nothing else moves the shard: so a shard at seq+1 says it committed. A
// shard still at seq says nothing yet (the transaction may still be
// applied, by a new leader): a fence moves it to seq+2 under the same
// compare, after which the transaction can never apply, so it failed. A
// shard at seq+2 is the fence's (applied although its own call failed).
// With etcd full (the space alarm raised), an unapplied write never
// applies: no fence is needed. ErrOutcomeUnknown when etcd does not answer
// within budget. Called with s.shard.mu held; it leaves s.shard as read.
func (s *Store) settle(ctx context.Context, u pendingCommit, budget time.Duration) (committed bool, err error) {
	k := s.shardK(s.seal.writer)
	deadline := time.Now().Add(budget)
	for {
		rerr := s.refreshShard(ctx)
		if rerr == nil {
			switch {
			case s.shard.seq == u.seq+1 && s.shard.cur == u.next:
				// It committed although the call failed (etcd applies the
				// write that crosses its space quota, then answers
				// "database space exceeded"; a timeout after the commit).
				return true, nil
			case s.shard.seq == u.seq+2 && s.shard.cur == u.cur:
				return false, nil // fenced
			case s.shard.seq != u.seq:
				return false, s.auth.Tamper(s.rel(k), fmt.Sprintf("this process's shard of the digest moved from write %d to %d while one transaction was outstanding", u.seq, s.shard.seq))
			}
			// Not applied yet: fence it.
			tctx, cancel := s.ctx(context.WithoutCancel(ctx))
			fresp, ferr := s.cli.Txn(tctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", u.rev)).
				Then(clientv3.OpPut(k, string(s.auth.Seal(s.rel(k), u.seq+2, u.cur.Bytes())))).Commit()
			cancel()
			if ferr == nil && fresp.Succeeded {
				s.shard.seq, s.shard.rev = u.seq+2, fresp.Header.Revision
				return false, nil
			}
			if errors.Is(ferr, rpctypes.ErrNoSpace) {
				// etcd is full: the fence is refused before it is
				// proposed, and the space alarm stops the transaction
				// too (etcd applies no put while it is raised).
				return false, nil
			}
			// The fence lost (the transaction applied meanwhile) or its
			// own outcome is unknown: read the shard again.
		}
		if time.Now().After(deadline) {
			return false, kms.ErrOutcomeUnknown
		}
		time.Sleep(100*time.Millisecond + time.Duration(rand.Int64N(int64(100*time.Millisecond))))
	}
}

// refreshShard reads this process's shard after a transaction that failed
// or whose outcome is unknown (it may have committed): a shard that moved
// on is taken as it is; one that went back is a rollback. Called with
// s.shard.mu held.
func (s *Store) refreshShard(ctx context.Context) error {
	k := s.shardK(s.seal.writer)
	resp, err := s.get(context.WithoutCancel(ctx), k)
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 0 {
		if s.shard.seq > 0 {
			return s.auth.Tamper(s.rel(k), "this process's shard of the digest was deleted")
		}
		return nil
	}
	body, seq, err := s.auth.Open(s.rel(k), resp.Kvs[0].Value)
	if err != nil {
		return err
	}
	d, err := storekit.ParseDigest(body)
	if err != nil {
		return s.auth.Tamper(s.rel(k), err.Error())
	}
	if seq < s.shard.seq {
		return s.auth.Tamper(s.rel(k), fmt.Sprintf("this process's shard of the digest went back from write %d to %d", s.shard.seq, seq))
	}
	s.shard.cur, s.shard.seq, s.shard.rev = d, seq, resp.Kvs[0].ModRevision
	return nil
}

func (s *Store) txn(ctx context.Context, cmps []clientv3.Cmp, ops, orElse []clientv3.Op) (*clientv3.TxnResponse, error) {
	s.ownMu.RLock()
	defer s.ownMu.RUnlock()
	send := func(ctx context.Context) (*clientv3.TxnResponse, error) {
		return s.cli.Txn(ctx).If(cmps...).Then(ops...).Else(orElse...).Commit()
	}
	var resp *clientv3.TxnResponse
	var err error
	if hook := testHookTxn.Load(); hook != nil {
		resp, err = (*hook)(ctx, send)
	} else {
		resp, err = send(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	if resp.Succeeded {
		s.noteOwn(resp.Header.Revision)
	}
	return resp, nil
}

// testHookTxn, if set (tests only), sends a transaction in place of
// txn: it may delay it, fail the call, or both.
var testHookTxn atomic.Pointer[func(ctx context.Context, send func(context.Context) (*clientv3.TxnResponse, error)) (*clientv3.TxnResponse, error)]

// ErrUntagged: the prefix holds records but no record key.
var ErrUntagged = errors.New("the etcd prefix holds records without tags and no record key: written by a kmsd from before records had tags, or forged by whoever can write etcd; check it is the prefix you expect, then start kmsd once with --upgrade-untagged-store to tag its records (README: Storage trust)")

// openAuth loads the prefix's record key, or makes one for a new prefix,
// or (with upgrade) for a prefix written before records had tags, whose
// records it then tags.
func (s *Store) openAuth(ctx context.Context, sealer kms.Sealer, upgrade bool) error {
	resp, err := s.get(ctx, s.recordKeyK())
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 0 {
		a, sealed, err := storekit.NewRecordKey(ctx, sealer)
		if err != nil {
			return err
		}
		legacy, err := s.holdsRecords(ctx)
		if err != nil {
			return err
		}
		if legacy && !upgrade {
			return ErrUntagged
		}
		// One replica's key wins; with records already there, the
		// upgrade marker goes in with it, in the same transaction (so at
		// the same revision).
		k := s.recordKeyK()
		ops := []clientv3.Op{clientv3.OpPut(k, string(sealed))}
		if legacy {
			ops = append(ops, clientv3.OpPut(s.upgradeK(), "from records without tags"))
		}
		tctx, cancel := s.ctx(ctx)
		tr, err := s.cli.Txn(tctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).Then(ops...).Commit()
		cancel()
		if err != nil {
			return fmt.Errorf("etcd: %w", err)
		}
		if tr.Succeeded {
			s.auth, s.keyRev = a, tr.Header.Revision
			s.setKeyRaw(sealed)
			if legacy {
				s.log.Warn("store: the prefix holds records written before records had tags; giving each its tag (--upgrade-untagged-store)", "prefix", s.p)
			}
			return s.finishUpgrade(ctx, upgrade)
		}
		if resp, err = s.get(ctx, k); err != nil || len(resp.Kvs) == 0 {
			return fmt.Errorf("etcd: the record key vanished while claimed: %v", err)
		}
	}
	if s.auth, err = storekit.OpenRecordKey(ctx, sealer, resp.Kvs[0].Value); err != nil {
		return err
	}
	s.setKeyRaw(resp.Kvs[0].Value)
	s.keyRev = resp.Kvs[0].CreateRevision
	return s.finishUpgrade(ctx, upgrade)
}

// holdsRecords reports whether the prefix holds anything but the ping
// key and elections.
func (s *Store) holdsRecords(ctx context.Context) (bool, error) {
	var counts [4]int64
	for i, k := range []string{s.p, s.p + "ping", s.p + "lead/", restoringK(s.p)} {
		opts := []clientv3.OpOption{clientv3.WithCountOnly()}
		if k != s.p+"ping" && k != restoringK(s.p) {
			opts = append(opts, clientv3.WithPrefix())
		}
		resp, err := s.get(ctx, k, opts...)
		if err != nil {
			return false, err
		}
		counts[i] = resp.Count
	}
	return counts[0]-counts[1]-counts[2]-counts[3] > 0, nil
}

// finishUpgrade gives their tag (seq 1) to the records written before the
// record key while the upgrade marker is set, in transactions of up to
// 100 records, each comparing that the records did not change, then
// removes the marker. It runs only with upgrade (a replica that crashed
// mid-way is taken over by the next start with the flag), only if the
// marker was written with the record key (same revision), and tags only
// records older than the key: a record written after it without a tag
// was forged, and stops the upgrade.
func (s *Store) finishUpgrade(ctx context.Context, upgrade bool) error {
	resp, err := s.get(ctx, s.upgradeK())
	if err != nil || len(resp.Kvs) == 0 {
		return err
	}
	if !upgrade {
		return fmt.Errorf("%w (an upgrade of the prefix's records is under way: finish it with --upgrade-untagged-store)", ErrUntagged)
	}
	if resp.Kvs[0].CreateRevision != s.keyRev {
		return s.auth.Tamper("m/upgrade", "the upgrade marker was not written with the record key")
	}
	n := 0
	for _, dir := range append([]string{"a/r/", "a/c/"}, digestedPrefixes...) {
		from := s.p + dir
		end := clientv3.GetPrefixRangeEnd(from)
		if !strings.HasSuffix(dir, "/") {
			end = from + "\x00"
		}
		for {
			r, err := s.get(ctx, from, clientv3.WithRange(end), clientv3.WithLimit(100))
			if err != nil {
				return err
			}
			w := s.wtx()
			for _, kv := range r.Kvs {
				key := string(kv.Key)
				if !digested(s.rel(key)) && !strings.HasPrefix(s.rel(key), "a/") {
					continue
				}
				if _, _, err := s.auth.Open(s.rel(key), kv.Value); err == nil {
					continue // done already
				}
				if kv.ModRevision >= s.keyRev {
					return s.auth.Tamper(s.rel(key), "a record without a tag was written after the record key")
				}
				w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision))
				if !digested(s.rel(key)) {
					w.ops = append(w.ops, clientv3.OpPut(key, string(s.auth.Seal(s.rel(key), 1, kv.Value))))
				} else if err := w.put(key, nil, kv.Value); err != nil {
					return err
				}
				n++
			}
			// The upgrade is still on: nobody finished it meanwhile.
			w.cmps = append(w.cmps, clientv3.Compare(clientv3.CreateRevision(s.upgradeK()), "=", resp.Kvs[0].CreateRevision))
			if len(w.ops) > 0 {
				tctx, cancel := s.ctx(ctx)
				tr, err := s.send(tctx, w)
				cancel()
				if err != nil {
					return err
				}
				if !tr.Succeeded {
					return s.finishUpgrade(ctx, upgrade) // another replica raced: read again
				}
			}
			if !r.More || len(r.Kvs) == 0 {
				break
			}
			from = string(r.Kvs[len(r.Kvs)-1].Key) + "\x00"
		}
	}
	tctx, cancel := s.ctx(ctx)
	defer cancel()
	if _, err := s.cli.Txn(tctx).If(clientv3.Compare(clientv3.CreateRevision(s.upgradeK()), "=", resp.Kvs[0].CreateRevision)).
		Then(clientv3.OpDelete(s.upgradeK())).Commit(); err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	s.upgraded = n
	return nil
}

// Upgraded reports how many records Open gave their first tag.
func (s *Store) Upgraded() int { return s.upgraded }

// Scrub checks every digested record's tag and that their terms sum to the
// shards of the store digest, all read at one revision. If they do not,
// every later read fails (the store is broken until kmsd restarts on a
// store that passes).
func (s *Store) Scrub(ctx context.Context) (storekit.ScrubReport, error) {
	start := time.Now()
	rep, err := s.scrub(ctx)
	for tries := 1; errors.Is(err, errCompacted); tries++ {
		if tries == scrubTries {
			// Compactions keep overtaking the scrub's reads: whoever
			// can compact etcd could be hiding a change this way.
			err = s.auth.Tamper("m/d/", fmt.Sprintf("the scrub could not read one revision in %d tries: etcd was compacted under it each time", scrubTries))
			break
		}
		rep, err = s.scrub(ctx)
	}
	rep.Took = time.Since(start)
	s.scrubs.Note(rep, err)
	if t := storekit.AsTamper(err); t != nil {
		s.auth.Break(t)
	}
	return rep, err
}

var errCompacted = errors.New("etcd: the scrub's revision was compacted")

// scrubTries bounds a scrub's reads lost to compactions.
const scrubTries = 10

func (s *Store) scrub(ctx context.Context) (storekit.ScrubReport, error) {
	var rep storekit.ScrubReport
	// What this process had written before the revision read: the shard
	// holds at least that at the revision.
	s.shard.mu.Lock()
	written := s.shard.seq
	s.shard.mu.Unlock()
	head, err := s.get(ctx, s.p+"ping")
	if err != nil {
		return rep, err
	}
	return s.scrubAt(ctx, head.Header.Revision, written)
}

// scrubAt is a scrub of the prefix as of revision at (Scrub's, or a
// dump's: a backup is only taken of a store that adds up); written is
// what this process's shard held at least by then.
func (s *Store) scrubAt(ctx context.Context, at int64, written uint64) (storekit.ScrubReport, error) {
	var rep storekit.ScrubReport
	var sum, shards storekit.Digest
	var mine *uint64
	sawKey := false
	for _, dir := range digestedPrefixes {
		from := s.p + dir
		end := clientv3.GetPrefixRangeEnd(from)
		if !strings.HasSuffix(dir, "/") {
			end = from + "\x00"
		}
		for {
			r, err := s.get(ctx, from, clientv3.WithRange(end), clientv3.WithRev(at), clientv3.WithLimit(1000))
			if err != nil {
				if strings.Contains(err.Error(), "compacted") {
					return rep, errCompacted
				}
				return rep, err
			}
			for _, kv := range r.Kvs {
				path := s.rel(string(kv.Key))
				switch {
				case strings.HasPrefix(path, "m/d/"):
					body, seq, err := s.auth.Open(path, kv.Value)
					if err != nil {
						return rep, err
					}
					d, err := storekit.ParseDigest(body)
					if err != nil {
						return rep, s.auth.Tamper(path, err.Error())
					}
					shards.Plus(d)
					rep.Seq += seq
					if path == "m/d/"+s.seal.writer {
						mine = &seq
					}
				case path == "m/upgrade":
					return rep, s.auth.Tamper(path, "an upgrade of records without tags is marked as under way, after the store had tags")
				case path == "m/"+storekit.RecordKeyMeta:
					sawKey = true
					if kv.CreateRevision != s.keyRev || !s.sameRecordKey(kv.Value) {
						return rep, s.auth.Tamper(path, "the record key is not the one loaded at start")
					}
				case !digested(path):
				default:
					if _, _, err := s.auth.Open(path, kv.Value); err != nil {
						return rep, err
					}
					sum.Plus(s.auth.Term(kv.Value))
					rep.Records++
				}
			}
			if !r.More || len(r.Kvs) == 0 {
				break
			}
			from = string(r.Kvs[len(r.Kvs)-1].Key) + "\x00"
		}
	}
	if !sawKey {
		return rep, s.auth.Tamper("m/"+storekit.RecordKeyMeta, "the record key was deleted")
	}
	if sum != shards {
		return rep, s.auth.Tamper("m/d/", "the records do not sum to the store digest: one was put back, deleted or added outside kmsd")
	}
	// Elections hold their key under a lease; a key without one was put
	// there to squat a role (destruction, checkpoints, sealing).
	lr, err := s.get(ctx, s.p+"lead/", clientv3.WithPrefix(), clientv3.WithRev(at), clientv3.WithKeysOnly())
	if err != nil {
		if isCompacted(err) {
			return rep, errCompacted
		}
		return rep, err
	}
	for _, kv := range lr.Kvs {
		if kv.Lease == 0 {
			return rep, s.auth.Tamper(s.rel(string(kv.Key)), "an election key without a lease (a role squatted outside kmsd)")
		}
	}
	if written > 0 && (mine == nil || *mine < written) {
		return rep, s.auth.Tamper("m/d/"+s.seal.writer, "this process's shard of the digest went back (the prefix was replaced by an earlier copy)")
	}
	return rep, nil
}

// Integrity reports the scrubs and the records refused.
func (s *Store) Integrity() storekit.Integrity { return s.scrubs.Report(s.auth) }

// Peek reads what kmsd needs before it opens the HSM, without the record
// key: the metadata value key (its tag unchecked: Open checks every
// record) and whether the prefix holds no key and no token.
func Peek(ctx context.Context, cli *clientv3.Client, prefix, key string) (value []byte, empty bool, err error) {
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	resp, err := cli.Get(ctx, prefix+"m/"+key)
	if err != nil {
		return nil, false, fmt.Errorf("etcd: %w", err)
	}
	if len(resp.Kvs) > 0 {
		value = resp.Kvs[0].Value
		if r, err := cli.Get(ctx, prefix+"m/"+storekit.RecordKeyMeta, clientv3.WithCountOnly()); err != nil {
			return nil, false, fmt.Errorf("etcd: %w", err)
		} else if r.Count > 0 {
			value = storekit.Unverified(value)
		}
	}
	empty = true
	for _, dir := range []string{"k/", "t/"} {
		r, err := cli.Get(ctx, prefix+dir, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return nil, false, fmt.Errorf("etcd: %w", err)
		}
		if r.Count > 0 {
			empty = false
		}
	}
	return value, empty, nil
}

// isCompacted reports whether err is etcd's refusal of a read at a
// revision compacted away.
func isCompacted(err error) bool {
	return errors.Is(err, rpctypes.ErrCompacted)
}

// Compactions counts the compactions destroys requested.
func (s *Store) Compactions() uint64 { return s.compactions.Load() }

// compactAfterDestroy compacts etcd's history up to the revision that
// destroyed version n of key name, so that the earlier revisions, which
// still hold its sealed material, are gone from etcd's history at once,
// not at the cluster's next compaction. The bytes may stay in free pages
// of etcd's database file until it is defragmented (README: Storage
// trust). A failure is logged: the material goes at the next compaction.
func (s *Store) compactAfterDestroy(ctx context.Context, name string, n uint64, rev int64) {
	if rev == 0 {
		return
	}
	tctx, cancel := s.ctx(context.WithoutCancel(ctx))
	defer cancel()
	if _, err := s.cli.Compact(tctx, rev, clientv3.WithCompactPhysical()); err != nil && !isCompacted(err) {
		s.log.Warn("etcd: compaction after a destroy failed; the destroyed version's sealed material stays in etcd's history until its next compaction", "key", name, "version", n, "revision", rev, "err", err)
		return
	}
	s.compactions.Add(1)
}

// setKeyRaw notes the sealed record key as the store holds it.
func (s *Store) setKeyRaw(b []byte) {
	s.keyMu.Lock()
	s.keyRaw = bytes.Clone(b)
	s.keyMu.Unlock()
}

// sameRecordKey reports whether sealed is the record key this store was
// opened with: the bytes loaded, or the same key sealed again under
// another KEK (a KEK rotation), which it then takes as the bytes.
func (s *Store) sameRecordKey(sealed []byte) bool {
	s.keyMu.Lock()
	same := bytes.Equal(sealed, s.keyRaw)
	s.keyMu.Unlock()
	if same {
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !s.auth.SameRecordKey(ctx, s.sealer, sealed) {
		return false
	}
	s.setKeyRaw(sealed)
	return true
}

// ResealRecordKey seals the prefix's record key again under the sealer's
// primary KEK (a KEK rotation), in a transaction that compares it did not
// change; false if it was under the primary already.
func (s *Store) ResealRecordKey(ctx context.Context) (bool, error) {
	k := s.recordKeyK()
	resp, err := s.get(ctx, k)
	if err != nil {
		return false, err
	}
	if len(resp.Kvs) == 0 {
		return false, errors.New("etcd: the record key is missing")
	}
	kv := resp.Kvs[0]
	next, err := s.auth.ResealRecordKey(ctx, s.sealer, kv.Value)
	if err != nil || next == nil {
		return false, err
	}
	tctx, cancel := s.ctx(ctx)
	defer cancel()
	s.ownMu.RLock()
	tr, err := s.cli.Txn(tctx).If(clientv3.Compare(clientv3.ModRevision(k), "=", kv.ModRevision)).Then(clientv3.OpPut(k, string(next))).Commit()
	if err == nil && tr.Succeeded {
		s.noteOwn(tr.Header.Revision)
	}
	s.ownMu.RUnlock()
	if err != nil {
		return false, fmt.Errorf("etcd: %w", err)
	}
	if !tr.Succeeded {
		return false, errors.New("etcd: the record key changed while it was sealed again (another replica?); try again")
	}
	s.setKeyRaw(next)
	return true, nil
}

// RecordKeyKEK is the KEK the prefix's record key is sealed under.
func (s *Store) RecordKeyKEK(ctx context.Context) (string, error) {
	resp, err := s.get(ctx, s.recordKeyK())
	if err != nil {
		return "", err
	}
	if len(resp.Kvs) == 0 {
		return "", errors.New("etcd: the record key is missing")
	}
	return storekit.RecordKeyKEK(s.sealer, resp.Kvs[0].Value)
}
