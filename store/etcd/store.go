// Package etcd is the replicated kms.Store: keys, versions, tokens and the
// audit log's rows in an etcd cluster under one prefix, shared by every
// kmsd replica.
//
// Every state change is one etcd transaction guarded by revisions
// (compare-and-swap): a key's header revision guards the key and its
// versions; a token write compares every token's revision (so that the
// last-admin check sees a snapshot). A transaction that loses a race is
// re-read and retried, so concurrent writers on different replicas
// serialize in etcd without in-process locks. The audit records a change
// carries go, pending, into its transaction, and are sealed into the log
// in commit order apart (seal.go).
package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

// Layout under the prefix P (numbers are 16 hex digits, so they sort):
//
//	P k/<name>                        key header (JSON kms.Key)
//	P v/<name>/<n>                    version n (JSON kms.Version)
//	P due/<unix ns>/<name>/<n>        a version scheduled for destruction
//	P b/<digest>                      the key whose versions list the blob
//	P t/<id>                          token (JSON kms.Token)
//	P a/r/<index>                     audit row (audit/engine)
//	P a/end                           index after the last audit row
//	P a/head                          the audit log's position after the last seal
//	P a/q/<writer>/<n>                a pending group of audit records (seal.go)
//	P a/c/<size>                      signed checkpoint of the tree at size
//	P m/<name>                        kmsd's own metadata
//
// Key names never hold '/' (kms.ValidateName).

// Options configure Open.
type Options struct {
	// Prefix is where kmsd's records live (default "/kmsd/").
	Prefix string
	// Logger receives the watch's troubles.
	Logger *slog.Logger
	// RequestTimeout bounds each etcd call (default 5s).
	RequestTimeout time.Duration
	// Sealer seals the prefix's record key (storekit.Auth) under the
	// HSM's KEK; required.
	Sealer kms.Sealer
	// UpgradeUntagged lets Open tag the records of a prefix that holds
	// records but no record key (written by a kmsd before records had
	// tags). Without it such a prefix is refused: it is also what a
	// prefix forged by whoever can write etcd looks like.
	UpgradeUntagged bool
}

// Store is a kms.Store and engine.Rows on etcd.
type Store struct {
	cli     *clientv3.Client
	p       string
	log     *slog.Logger
	timeout time.Duration
	audit   *engine.Log

	watchers storekit.Watchers
	// own holds the revisions of this process's commits, which it reported
	// at commit: the watch skips their events. Commits hold ownMu's read
	// lock from the request to the insert; the watch takes the write lock
	// to look, so it never sees a commit of ours before it is noted.
	ownMu   sync.RWMutex
	ownSet  sync.Mutex // guards own under ownMu's read lock
	own     map[int64]bool
	quit    chan struct{}
	watched chan struct{}
	health  watchHealth
	// watchFrom is the revision the watch starts at.
	watchFrom int64
	closeOnce sync.Once
	closeErr  error
	seal      sealer

	obs         storekit.Observed
	auth        *storekit.Auth
	keyMu       sync.Mutex
	keyRaw      []byte // the sealed record key as loaded (or sealed again), and its create revision
	keyRev      int64
	sealer      kms.Sealer
	shard       shard
	scrubs      storekit.Scrubs
	upgraded    int
	compactions atomic.Uint64
}

var (
	_ kms.Store   = (*Store)(nil)
	_ engine.Rows = (*Store)(nil)
)

// Open returns a Store over cli (which the caller closes after the Store)
// and starts its audit log and its watch of the prefix.
func Open(ctx context.Context, cli *clientv3.Client, o Options) (*Store, error) {
	if o.Prefix == "" {
		o.Prefix = "/kmsd/"
	}
	if !strings.HasSuffix(o.Prefix, "/") {
		o.Prefix += "/"
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.RequestTimeout == 0 {
		o.RequestTimeout = 5 * time.Second
	}
	if o.Sealer == nil {
		return nil, errors.New("etcd: Options.Sealer is required (it seals the record key)")
	}
	s := &Store{cli: cli, p: o.Prefix, log: o.Logger, timeout: o.RequestTimeout, quit: make(chan struct{}), watched: make(chan struct{}), own: map[int64]bool{}}
	// The watch starts right after this read's revision: nothing committed
	// after Open returns is missed, whenever the watch is set up.
	resp, err := s.get(ctx, s.p+"ping")
	if err != nil {
		return nil, err
	}
	s.watchFrom = resp.Header.Revision + 1
	s.seal.writer = newWriter()
	s.sealer = o.Sealer
	if err := s.openAuth(ctx, o.Sealer, o.UpgradeUntagged); err != nil {
		return nil, err
	}
	// Checked before anything acts on the records: at every start.
	if _, err := s.Scrub(ctx); err != nil {
		return nil, err
	}
	// The watch starts after what Open wrote (the record key, an
	// upgrade's tags), which it would take for changes made outside.
	if resp, err = s.get(ctx, s.p+"ping"); err != nil {
		return nil, err
	}
	s.watchFrom = resp.Header.Revision + 1
	// A group's rows go in one transaction: etcd takes 128 operations
	// per transaction by default (--max-txn-ops), the end key among them.
	s.audit = engine.New(s, engine.Options{MaxGroup: 100})
	if err := s.audit.Start(ctx); err != nil {
		return nil, err
	}
	s.health.base = time.Now()
	s.health.fresh.Store(-1)
	s.health.sent = map[string]time.Duration{}
	go s.watch()
	s.startSealing()
	return s, nil
}

// Audit is the store's audit log (a kms.AuditStore).
func (s *Store) Audit() *engine.Log { return s.audit }

// Close stops the audit log and the watch; closing again does nothing.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closeErr = s.audit.Close()
		s.stopSealing()
		close(s.quit)
		<-s.watched
	})
	return s.closeErr
}

func hex16(n uint64) string { return fmt.Sprintf("%016x", n) }

func (s *Store) keyK(name string) string               { return s.p + "k/" + name }
func (s *Store) versionK(name string, n uint64) string { return s.p + "v/" + name + "/" + hex16(n) }
func (s *Store) dueK(at time.Time, name string, n uint64) string {
	return s.p + "due/" + hex16(uint64(max(at.UnixNano(), 0))) + "/" + name + "/" + hex16(n)
}
func (s *Store) blobK(d string) string       { return s.p + "b/" + d }
func (s *Store) tokenK(id string) string     { return s.p + "t/" + id }
func (s *Store) rowK(i uint64) string        { return s.p + "a/r/" + hex16(i) }
func (s *Store) headK() string               { return s.p + "a/head" }
func (s *Store) endK() string                { return s.p + "a/end" }
func (s *Store) checkpointK(n uint64) string { return s.p + "a/c/" + hex16(n) }
func (s *Store) metaK(k string) string       { return s.p + "m/" + k }

func (s *Store) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.timeout)
}

func notFound(what, name string) error {
	return &kms.Error{Kind: kms.KindNotFound, Msg: fmt.Sprintf("%s %q not found", what, name)}
}

func exists(what, name string) error {
	return &kms.Error{Kind: kms.KindAlreadyExists, Msg: fmt.Sprintf("%s %q already exists", what, name)}
}

// errConflict: a compare of the transaction failed; it is re-read and
// retried.
var errConflict = errors.New("etcd: the records changed under the transaction")

// backoff waits a random few milliseconds before a retry, so that replicas
// racing for the same records stop colliding in step.
func backoff() { time.Sleep(time.Duration(rand.Int64N(int64(4 * time.Millisecond)))) }

// retryBudget bounds how long one state change that keeps losing races is
// retried: a time, not a count, since under contention among replicas a
// change can lose many races within a second (deploy/bench-replicas.sh
// had rotations answered 409 after 16 lost races).
const retryBudget = 5 * time.Second

// retry runs attempt (which reads, decides and commits) until it commits or
// fails for another reason than a lost race (errConflict), backing off
// between tries, and tells the watchers what the commit changed.
func (s *Store) retry(what string, attempt func() ([]kms.Change, error)) error {
	start := time.Now()
	for n := 1; ; n++ {
		chs, err := attempt()
		if !errors.Is(err, errConflict) {
			if err == nil {
				s.changed(chs)
			}
			return err
		}
		if time.Since(start) > retryBudget {
			return fmt.Errorf("%s: %w %d times in %v", what, errConflict, n, retryBudget)
		}
		backoff()
	}
}

// created turns a lost race of a create into ErrAlreadyExists if the record
// now exists (another writer made it), and leaves it a conflict otherwise.
func (s *Store) created(ctx context.Context, err error, key, what, name string) error {
	if !errors.Is(err, errConflict) {
		return err
	}
	resp, gerr := s.get(ctx, key, clientv3.WithCountOnly())
	if gerr != nil {
		return gerr
	}
	if resp.Count > 0 {
		return exists(what, name)
	}
	return err
}

// commit runs one transaction: cmps and ops, plus recs as one pending
// group of the audit log (seal.go), which the transaction's revision puts
// in the log's order. Nothing in it compares the log's end, so replicas'
// transactions do not race each other for the log. It returns errConflict
// if a compare failed; recs are marked Committed once it commits.
func (s *Store) commit(ctx context.Context, w *wtx, recs []*kms.AuditRecord) (err error) {
	if len(recs) > 0 {
		if err := w.put(s.pendingK(), nil, []byte(encodePending(recs))); err != nil {
			return err
		}
	}
	if len(w.ops) == 0 {
		return nil
	}
	// Every commit moves this process's digest shard, even one that
	// changes no digested record (an audit group alone): the shard is how
	// a commit whose call failed is found to have committed or not
	// (send, resolve).
	w.moved = true
	// Once sent, a transaction is not abandoned when the caller's context
	// ends (a client that went away mid-request): abandoned, it might
	// still commit, and the caller would report a failure, with a record
	// of it, for a change that took effect. The timeout still bounds it.
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("etcd: %w", err) // gone before anything was sent
	}
	tctx, cancel := s.ctx(context.WithoutCancel(ctx))
	defer cancel()
	if testHookBeforeCommit != nil {
		testHookBeforeCommit()
	}
	start := time.Now()
	resp, err := s.send(tctx, w)
	if err != nil {
		s.obs.Done(start, "error")
		return err
	}
	if !resp.Succeeded {
		// Which compare failed is not said; the caller re-reads.
		s.obs.Done(start, "conflict")
		return errConflict
	}
	s.obs.Done(start, "ok")
	for _, r := range recs {
		r.Committed = true
	}
	return nil
}

// SetObserver sets who is told of each write transaction (metrics).
func (s *Store) SetObserver(o storekit.Observer) { s.obs.Set(o) }

// SinceHeard is how long ago the watch last heard from etcd (an event or
// a progress notice).
func (s *Store) SinceHeard() time.Duration {
	return time.Since(time.Unix(0, s.health.heard.Load()))
}

// testHookBeforeCommit, if set (tests only), runs as a transaction is sent.
var testHookBeforeCommit func()

func (s *Store) get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	// A broken store answers no read, not even "not found".
	if s.auth != nil {
		if err := s.auth.Check(); err != nil {
			return nil, err
		}
	}
	tctx, cancel := s.ctx(ctx)
	defer cancel()
	resp, err := s.cli.Get(tctx, key, opts...)
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	return resp, nil
}

// Ping implements kms.Store: a linearizable read, which needs a quorum.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.auth.Check(); err != nil {
		return err
	}
	_, err := s.get(ctx, s.p+"ping")
	return err
}

// decode checks the record stored at key and decodes its body.
func decode[T any](s *Store, what, key string, stored []byte) (*T, error) {
	buf, err := s.open(key, stored)
	if err != nil {
		return nil, err
	}
	var x T
	if err := json.Unmarshal(buf, &x); err != nil {
		return nil, fmt.Errorf("decode %s record: %w", what, err)
	}
	return &x, nil
}

func encode(x any) []byte {
	b, err := json.Marshal(x)
	if err != nil {
		panic("etcd: record does not encode: " + err.Error()) // plain structs: cannot happen
	}
	return b
}

// putVersion adds the ops that write a version, move its destroy-schedule
// entry (old: where it was indexed, nil if nowhere) and index its blobs
// not yet owned (owned: what the transaction read; a compare keeps them
// unowned until commit).
// prev is the version's record as read (nil for a new version).
func (s *Store) putVersion(w *wtx, name string, v *kms.Version, prev []byte, old *time.Time, owned map[string]bool) error {
	if err := w.put(s.versionK(name, v.Number), prev, encode(v)); err != nil {
		return err
	}
	at := storekit.ScheduledAt(v)
	if old != nil && (at == nil || !at.Equal(*old)) {
		k := s.dueK(*old, name, v.Number)
		if err := w.del(k, s.index(k, nil)); err != nil {
			return err
		}
	}
	if at != nil && (old == nil || !at.Equal(*old)) {
		if err := w.put(s.dueK(*at, name, v.Number), nil, nil); err != nil {
			return err
		}
	}
	for _, d := range v.Blobs {
		if !owned[d] {
			owned[d] = true
			if err := w.put(s.blobK(d), nil, []byte(name)); err != nil {
				return err
			}
			w.cmps = append(w.cmps, clientv3.Compare(clientv3.CreateRevision(s.blobK(d)), "=", 0))
		}
	}
	return nil
}

// owners reads which of the blobs already have an owner.
func (s *Store) owners(ctx context.Context, vs ...*kms.Version) (map[string]bool, error) {
	owned := map[string]bool{}
	for _, v := range vs {
		for _, d := range v.Blobs {
			if _, done := owned[d]; done {
				continue
			}
			resp, err := s.get(ctx, s.blobK(d), clientv3.WithCountOnly())
			if err != nil {
				return nil, err
			}
			owned[d] = resp.Count > 0
		}
	}
	return owned, nil
}

// CreateKey implements kms.Store.
func (s *Store) CreateKey(ctx context.Context, k *kms.Key, v *kms.Version, audit []*kms.AuditRecord) error {
	if v.Number != 1 || k.Latest != 1 {
		return errors.New("a new key has version 1 only")
	}
	return s.retry("create key "+k.Name, func() ([]kms.Change, error) {
		owned, err := s.owners(ctx, v)
		if err != nil {
			return nil, err
		}
		w := s.wtx()
		w.cmps = append(w.cmps, clientv3.Compare(clientv3.CreateRevision(s.keyK(k.Name)), "=", 0))
		if err := w.put(s.keyK(k.Name), nil, encode(k)); err != nil {
			return nil, err
		}
		if err := s.putVersion(w, k.Name, v, nil, nil, owned); err != nil {
			return nil, err
		}
		err = s.created(ctx, s.commit(ctx, w, audit), s.keyK(k.Name), "key", k.Name)
		return []kms.Change{{Key: k.Name}, {Key: k.Name, Version: 1}}, err
	})
}

// GetKey implements kms.Store.
func (s *Store) GetKey(ctx context.Context, name string) (*kms.Key, error) {
	resp, err := s.get(ctx, s.keyK(name))
	if err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		return nil, notFound("key", name)
	}
	return decode[kms.Key](s, "key", s.keyK(name), resp.Kvs[0].Value)
}

// GetVersion implements kms.Store.
func (s *Store) GetVersion(ctx context.Context, name string, n uint64) (*kms.Version, error) {
	resp, err := s.get(ctx, s.versionK(name, n))
	if err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		return nil, &kms.Error{Kind: kms.KindNotFound, Msg: fmt.Sprintf("key %q has no version %d", name, n)}
	}
	return decode[kms.Version](s, "version", s.versionK(name, n), resp.Kvs[0].Value)
}

// listAfter decodes up to limit records under dir whose names sort after
// `after`, in name order.
func listAfter[T any](ctx context.Context, s *Store, dir, what, after string, limit int) ([]*T, error) {
	if limit <= 0 {
		return nil, nil
	}
	from := s.p + dir
	if after != "" {
		from += after + "\x00"
	}
	resp, err := s.get(ctx, from, clientv3.WithRange(clientv3.GetPrefixRangeEnd(s.p+dir)), clientv3.WithLimit(int64(limit)))
	if err != nil {
		return nil, err
	}
	out := make([]*T, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		x, err := decode[T](s, what, string(kv.Key), kv.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, x)
	}
	return out, nil
}

// ListKeys implements kms.Store.
func (s *Store) ListKeys(ctx context.Context, after string, limit int) ([]*kms.Key, error) {
	return listAfter[kms.Key](ctx, s, "k/", "key", after, limit)
}

// ListVersions implements kms.Store: the header and the versions are read
// at one revision.
func (s *Store) ListVersions(ctx context.Context, name string, before uint64, limit int) (*kms.Key, []*kms.Version, error) {
	for tries := 1; ; tries++ {
		k, vs, err := s.listVersions(ctx, name, before, limit)
		if !isCompacted(err) || tries == 3 {
			return k, vs, err
		}
		// Compacted between the header's read and the versions': again.
	}
}

func (s *Store) listVersions(ctx context.Context, name string, before uint64, limit int) (*kms.Key, []*kms.Version, error) {
	hresp, err := s.get(ctx, s.keyK(name))
	if err != nil {
		return nil, nil, err
	}
	if len(hresp.Kvs) == 0 {
		return nil, nil, notFound("key", name)
	}
	k, err := decode[kms.Key](s, "key", s.keyK(name), hresp.Kvs[0].Value)
	if err != nil {
		return nil, nil, err
	}
	n := k.Latest
	if before != 0 && before-1 < n {
		n = before - 1
	}
	if n < 1 || limit <= 0 {
		return k, nil, nil
	}
	want := min(uint64(limit), n)
	resp, err := s.get(ctx, s.versionK(name, n-want+1), clientv3.WithRange(s.versionK(name, n+1)),
		clientv3.WithRev(hresp.Header.Revision), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
	if err != nil {
		return nil, nil, err
	}
	if uint64(len(resp.Kvs)) != want {
		return nil, nil, fmt.Errorf("key %q: %d of versions %d..%d found", name, len(resp.Kvs), n-want+1, n)
	}
	out := make([]*kms.Version, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		v, err := decode[kms.Version](s, "version", string(kv.Key), kv.Value)
		if err != nil {
			return nil, nil, err
		}
		out = append(out, v)
	}
	return k, out, nil
}

// DueVersions implements kms.Store.
func (s *Store) DueVersions(ctx context.Context, now time.Time, limit int) ([]kms.VersionRef, error) {
	end := s.p + "due/" + hex16(uint64(max(now.UnixNano(), 0))+1)
	resp, err := s.get(ctx, s.p+"due/", clientv3.WithRange(end), clientv3.WithLimit(int64(limit)))
	if err != nil {
		return nil, err
	}
	var out []kms.VersionRef
	for _, kv := range resp.Kvs {
		if _, err := s.open(string(kv.Key), kv.Value); err != nil {
			return nil, err
		}
		parts := strings.Split(strings.TrimPrefix(string(kv.Key), s.p+"due/"), "/")
		if len(parts) != 3 {
			return nil, fmt.Errorf("etcd: malformed schedule entry %q", kv.Key)
		}
		n, err := strconv.ParseUint(parts[2], 16, 64)
		if err != nil {
			return nil, fmt.Errorf("etcd: malformed schedule entry %q", kv.Key)
		}
		out = append(out, kms.VersionRef{Key: parts[1], Version: n})
	}
	return out, nil
}

// UpdateKey implements kms.Store. fn runs again, on records read anew, if
// another writer changed the key (or appended to the audit log) first: it
// must act only through tx.
func (s *Store) UpdateKey(ctx context.Context, name string, fn func(kms.KeyTx) ([]*kms.AuditRecord, error)) error {
	return s.retry("update key "+name, func() ([]kms.Change, error) {
		resp, err := s.get(ctx, s.keyK(name))
		if err != nil {
			return nil, err
		}
		if len(resp.Kvs) == 0 {
			return nil, notFound("key", name)
		}
		k, err := decode[kms.Key](s, "key", s.keyK(name), resp.Kvs[0].Value)
		if err != nil {
			return nil, err
		}
		rev := resp.Kvs[0].ModRevision
		// Versions change only with their header: read at its revision.
		at := resp.Header.Revision
		stored := map[uint64][]byte{}
		wasDestroyed := map[uint64]bool{}
		kt := storekit.NewKeyTx(k, func(n uint64) ([]byte, error) {
			r, err := s.get(ctx, s.versionK(name, n), clientv3.WithRev(at))
			if isCompacted(err) {
				return nil, errConflict // compacted after the header was read: read again
			}
			if err != nil || len(r.Kvs) == 0 {
				return nil, err
			}
			stored[n] = r.Kvs[0].Value
			body, err := s.open(s.versionK(name, n), r.Kvs[0].Value)
			if err == nil {
				var st struct{ State kms.State }
				_ = json.Unmarshal(body, &st)
				wasDestroyed[n] = st.State == kms.StateDestroyed
			}
			return body, err
		})
		audit, err := fn(kt)
		if err != nil {
			return nil, err
		}
		if err := kt.Check(name); err != nil {
			return nil, err
		}
		all := make([]*kms.Version, 0, len(kt.Loaded)+len(kt.Added))
		for _, v := range kt.Loaded {
			all = append(all, v)
		}
		all = append(all, kt.Added...)
		owned, err := s.owners(ctx, all...)
		if err != nil {
			return nil, err
		}
		w := s.wtx()
		w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(s.keyK(name)), "=", rev))
		if err := w.put(s.keyK(name), resp.Kvs[0].Value, encode(k)); err != nil {
			return nil, err
		}
		chs := []kms.Change{{Key: name}}
		for n, v := range kt.Loaded {
			if err := s.putVersion(w, name, v, stored[n], kt.Due[n], owned); err != nil {
				return nil, err
			}
			chs = append(chs, kms.Change{Key: name, Version: n})
		}
		for _, v := range kt.Added {
			if err := s.putVersion(w, name, v, nil, nil, owned); err != nil {
				return nil, err
			}
			chs = append(chs, kms.Change{Key: name, Version: v.Number})
		}
		if err := s.commit(ctx, w, audit); err != nil {
			return nil, err
		}
		for n, v := range kt.Loaded {
			if v.State == kms.StateDestroyed && !wasDestroyed[n] {
				s.compactAfterDestroy(ctx, name, n, w.rev)
				break
			}
		}
		return chs, nil
	})
}

// CreateToken implements kms.Store.
func (s *Store) CreateToken(ctx context.Context, t *kms.Token, audit []*kms.AuditRecord) error {
	return s.retry("create token", func() ([]kms.Change, error) {
		w := s.wtx()
		w.cmps = append(w.cmps, clientv3.Compare(clientv3.CreateRevision(s.tokenK(t.ID)), "=", 0))
		if err := w.put(s.tokenK(t.ID), nil, encode(t)); err != nil {
			return nil, err
		}
		err := s.commit(ctx, w, audit)
		return []kms.Change{{Token: t.ID}}, s.created(ctx, err, s.tokenK(t.ID), "token", t.ID)
	})
}

// CreateFirstToken implements kms.Store: the token prefix is read empty
// at a revision and must not have changed by the commit.
func (s *Store) CreateFirstToken(ctx context.Context, t *kms.Token, audit []*kms.AuditRecord) error {
	return s.retry("create first token", func() ([]kms.Change, error) {
		resp, err := s.get(ctx, s.p+"t/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return nil, err
		}
		if resp.Count > 0 {
			return nil, exists("token", "(a first one)")
		}
		w := s.wtx()
		w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(s.p+"t/"), "<", resp.Header.Revision+1).WithPrefix())
		if err := w.put(s.tokenK(t.ID), nil, encode(t)); err != nil {
			return nil, err
		}
		return []kms.Change{{Token: t.ID}}, s.commit(ctx, w, audit)
	})
}

// GetToken implements kms.Store.
func (s *Store) GetToken(ctx context.Context, id string) (*kms.Token, error) {
	resp, err := s.get(ctx, s.tokenK(id))
	if err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		return nil, notFound("token", id)
	}
	return decode[kms.Token](s, "token", s.tokenK(id), resp.Kvs[0].Value)
}

// CountTokens implements kms.Store.
func (s *Store) CountTokens(ctx context.Context) (int, error) {
	resp, err := s.get(ctx, s.p+"t/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, err
	}
	return int(resp.Count), nil
}

// ListTokens implements kms.Store.
func (s *Store) ListTokens(ctx context.Context, after string, limit int) ([]*kms.Token, error) {
	return listAfter[kms.Token](ctx, s, "t/", "token", after, limit)
}

// UpdateToken implements kms.Store. The transaction commits only if no
// token changed since fn's token was read, so what fn reads of other
// tokens (the last-admin check) holds at commit; otherwise fn runs again.
func (s *Store) UpdateToken(ctx context.Context, id string, fn func(t *kms.Token) ([]*kms.AuditRecord, error)) error {
	return s.retry("update token "+id, func() ([]kms.Change, error) {
		resp, err := s.get(ctx, s.tokenK(id))
		if err != nil {
			return nil, err
		}
		if len(resp.Kvs) == 0 {
			return nil, notFound("token", id)
		}
		t, err := decode[kms.Token](s, "token", s.tokenK(id), resp.Kvs[0].Value)
		if err != nil {
			return nil, err
		}
		audit, err := fn(t)
		if err != nil {
			return nil, err
		}
		if t.ID != id {
			return nil, errors.New("a token's id cannot change")
		}
		w := s.wtx()
		w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(s.p+"t/"), "<", resp.Header.Revision+1).WithPrefix())
		if err := w.put(s.tokenK(id), resp.Kvs[0].Value, encode(t)); err != nil {
			return nil, err
		}
		return []kms.Change{{Token: id}}, s.commit(ctx, w, audit)
	})
}

// RecordTokenUse implements kms.Store.
func (s *Store) RecordTokenUse(ctx context.Context, used map[string]time.Time) error {
	return s.retry("record token use", func() ([]kms.Change, error) {
		w := s.wtx()
		var chs []kms.Change
		for id, at := range used {
			resp, err := s.get(ctx, s.tokenK(id))
			if err != nil {
				return nil, err
			}
			if len(resp.Kvs) == 0 {
				continue
			}
			t, err := decode[kms.Token](s, "token", s.tokenK(id), resp.Kvs[0].Value)
			if err != nil {
				return nil, err
			}
			if t.LastUsedAt != nil && !at.After(*t.LastUsedAt) {
				continue
			}
			at := at
			t.LastUsedAt = &at
			w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(s.tokenK(id)), "=", resp.Kvs[0].ModRevision))
			if err := w.put(s.tokenK(id), resp.Kvs[0].Value, encode(t)); err != nil {
				return nil, err
			}
			chs = append(chs, kms.Change{Token: id})
		}
		return chs, s.commit(ctx, w, nil)
	})
}

// DeleteTokens implements kms.Store: each token read is compared
// unchanged at the commit.
func (s *Store) DeleteTokens(ctx context.Context, ids []string, audit []*kms.AuditRecord) error {
	return s.retry("delete tokens", func() ([]kms.Change, error) {
		w := s.wtx()
		var chs []kms.Change
		for _, id := range ids {
			resp, err := s.get(ctx, s.tokenK(id))
			if err != nil {
				return nil, err
			}
			if len(resp.Kvs) == 0 {
				continue
			}
			w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(s.tokenK(id)), "=", resp.Kvs[0].ModRevision))
			if err := w.del(s.tokenK(id), resp.Kvs[0].Value); err != nil {
				return nil, err
			}
			chs = append(chs, kms.Change{Token: id})
		}
		return chs, s.commit(ctx, w, audit)
	})
}

// BlobOwner implements kms.Store.
func (s *Store) BlobOwner(ctx context.Context, digest string) (string, error) {
	resp, err := s.get(ctx, s.blobK(digest))
	if err != nil {
		return "", err
	}
	if len(resp.Kvs) == 0 {
		return "", notFound("blob", digest)
	}
	name, err := s.open(s.blobK(digest), resp.Kvs[0].Value)
	return string(name), err
}

// Meta returns a value of kmsd's own metadata (nil if unset).
func (s *Store) Meta(key string) ([]byte, error) {
	resp, err := s.get(context.Background(), s.metaK(key))
	if err != nil || len(resp.Kvs) == 0 {
		return nil, err
	}
	return s.open(s.metaK(key), resp.Kvs[0].Value)
}

// PutMeta sets a value of kmsd's own metadata.
func (s *Store) PutMeta(key string, value []byte) error {
	ctx := context.Background()
	return s.retry("put meta "+key, func() ([]kms.Change, error) {
		resp, err := s.get(ctx, s.metaK(key))
		if err != nil {
			return nil, err
		}
		w := s.wtx()
		var old []byte
		var rev int64
		if len(resp.Kvs) > 0 {
			old, rev = resp.Kvs[0].Value, resp.Kvs[0].ModRevision
		}
		w.cmps = append(w.cmps, clientv3.Compare(clientv3.ModRevision(s.metaK(key)), "=", rev))
		if err := w.put(s.metaK(key), old, value); err != nil {
			return nil, err
		}
		return nil, s.commit(ctx, w, nil)
	})
}

// ClaimMeta sets a value of kmsd's own metadata unless it is set (one
// transaction), and returns the value stored: value if this call set it.
// Of replicas starting at once on an empty prefix, one claims.
func (s *Store) ClaimMeta(key string, value []byte) ([]byte, error) {
	ctx, cancel := s.ctx(context.Background())
	defer cancel()
	k := s.metaK(key)
	w := s.wtx()
	w.cmps = append(w.cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
	if err := w.put(k, nil, value); err != nil {
		return nil, err
	}
	resp, err := s.send(ctx, w, clientv3.OpGet(k))
	if err != nil {
		return nil, err
	}
	if resp.Succeeded {
		return value, nil
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		return s.open(k, kvs[0].Value)
	}
	return nil, fmt.Errorf("etcd: meta %s vanished while claimed", key)
}

// Empty reports whether the prefix holds no key and no token.
func (s *Store) Empty() (bool, error) {
	for _, dir := range []string{"k/", "t/"} {
		resp, err := s.get(context.Background(), s.p+dir, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return false, err
		}
		if resp.Count > 0 {
			return false, nil
		}
	}
	return true, nil
}

// WriteAudit implements engine.Rows: recs become one pending group.
func (s *Store) WriteAudit(ctx context.Context, recs []*kms.AuditRecord) error {
	return s.commit(ctx, s.wtx(), recs)
}

// ReadHead implements engine.HeadReader.
func (s *Store) ReadHead(ctx context.Context) ([]byte, error) {
	resp, err := s.get(ctx, s.headK())
	if err != nil || len(resp.Kvs) == 0 {
		return nil, err
	}
	return s.open(s.headK(), resp.Kvs[0].Value)
}

// RowsEnd implements engine.Rows.
func (s *Store) RowsEnd(ctx context.Context) (uint64, error) {
	resp, err := s.get(ctx, s.endK())
	if err != nil {
		return 0, err
	}
	if len(resp.Kvs) == 0 {
		return 0, nil
	}
	return s.parseEnd(resp.Kvs[0].Value)
}

// parseEnd checks and decodes the stored log end.
func (s *Store) parseEnd(stored []byte) (uint64, error) {
	body, err := s.open(s.endK(), stored)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(string(body), 16, 64)
	if err != nil {
		return 0, fmt.Errorf("etcd: malformed audit end %q", body)
	}
	return n, nil
}

// ReadRows implements engine.Rows, in pages.
func (s *Store) ReadRows(ctx context.Context, start, end uint64) ([][]byte, error) {
	out := make([][]byte, 0, end-start)
	for start < end {
		resp, err := s.get(ctx, s.rowK(start), clientv3.WithRange(s.rowK(end)), clientv3.WithLimit(1000))
		if err != nil {
			return nil, err
		}
		if len(resp.Kvs) == 0 {
			return nil, fmt.Errorf("audit: record %d missing", start)
		}
		for _, kv := range resp.Kvs {
			if string(kv.Key) != s.rowK(start) {
				return nil, fmt.Errorf("audit: record %d missing", start)
			}
			row, err := s.open(string(kv.Key), kv.Value)
			if err != nil {
				return nil, err
			}
			out = append(out, row)
			start++
		}
	}
	return out, nil
}

// PutCheckpoint implements engine.Rows.
func (s *Store) PutCheckpoint(ctx context.Context, size uint64, note []byte) error {
	tctx, cancel := s.ctx(ctx)
	defer cancel()
	k := s.checkpointK(size)
	_, err := s.cli.Put(tctx, k, string(s.auth.Seal(s.rel(k), 1, note)))
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	return nil
}

// LatestCheckpoint implements engine.Rows.
func (s *Store) LatestCheckpoint(ctx context.Context) (uint64, []byte, error) {
	resp, err := s.get(ctx, s.p+"a/c/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend), clientv3.WithLimit(1))
	if err != nil {
		return 0, nil, err
	}
	if len(resp.Kvs) == 0 {
		return 0, nil, &kms.Error{Kind: kms.KindNotFound, Msg: "no audit checkpoint yet"}
	}
	n, err := strconv.ParseUint(strings.TrimPrefix(string(resp.Kvs[0].Key), s.p+"a/c/"), 16, 64)
	if err != nil {
		return 0, nil, fmt.Errorf("etcd: malformed checkpoint key %q", resp.Kvs[0].Key)
	}
	note, err := s.open(string(resp.Kvs[0].Key), resp.Kvs[0].Value)
	return n, note, err
}
