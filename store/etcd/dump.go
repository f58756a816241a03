package etcd

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

var (
	_ store.Dumper = (*Store)(nil)
	_ store.Loader = (*conn)(nil)
)

// restoringK marks a prefix a load is filling: set first, deleted last.
// kmsd refuses to start on a prefix that has it (Peek), and the next load
// clears the prefix and starts again. Not a record: it holds nothing.
func restoringK(prefix string) string { return prefix + "restoring" }

// ErrRestoreUnfinished: the prefix holds what a load that did not finish
// wrote.
var ErrRestoreUnfinished = errors.New("a restore into this etcd prefix did not finish: run kmsd restore again (it replaces what the interrupted one wrote); kmsd does not start on a half-restored store")

// Dump implements store.Dumper: the pending audit groups are sealed, then
// every range is read at one revision, each record's tag checked.
func (s *Store) Dump(ctx context.Context, to store.Sink) error {
	if err := s.Settle(ctx); err != nil {
		return fmt.Errorf("seal the pending audit records: %w", err)
	}
	if err := s.auth.Check(); err != nil {
		return err
	}
	s.shard.mu.Lock()
	written := s.shard.seq
	s.shard.mu.Unlock()
	first, err := s.get(ctx, s.p+"ping")
	if err != nil {
		return err
	}
	rev := first.Header.Revision
	// What is dumped adds up to the store digest at that revision: a
	// record put back is found here, not laundered into a signed backup.
	if _, err := s.scrubAt(ctx, rev, written); err != nil {
		if t := storekit.AsTamper(err); t != nil {
			s.auth.Break(t)
		}
		return err
	}
	// each reads the range dir at rev in key order, each record checked.
	each := func(dir string, fn func(rel string, body []byte, kv *mvccpb.KeyValue) error) error {
		from, end := s.p+dir, clientv3.GetPrefixRangeEnd(s.p+dir)
		for {
			resp, err := s.get(ctx, from, clientv3.WithRange(end), clientv3.WithRev(rev), clientv3.WithLimit(500))
			if err != nil {
				return err
			}
			for _, kv := range resp.Kvs {
				if !dumped(s.rel(string(kv.Key))) {
					continue
				}
				body, err := s.open(string(kv.Key), kv.Value)
				if err != nil {
					return err
				}
				if err := fn(s.rel(string(kv.Key)), body, kv); err != nil {
					return err
				}
			}
			if !resp.More || len(resp.Kvs) == 0 {
				return nil
			}
			from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
		}
	}
	err = each("m/", func(rel string, body []byte, _ *mvccpb.KeyValue) error {
		return to.Meta(strings.TrimPrefix(rel, "m/"), body)
	})
	if err == nil {
		err = each("k/", func(_ string, body []byte, _ *mvccpb.KeyValue) error {
			var k kms.Key
			if err := json.Unmarshal(body, &k); err != nil {
				return err
			}
			return to.Key(&k)
		})
	}
	if err == nil {
		err = each("v/", func(rel string, body []byte, _ *mvccpb.KeyValue) error {
			name := rel[len("v/"):strings.LastIndexByte(rel, '/')]
			var v kms.Version
			if err := json.Unmarshal(body, &v); err != nil {
				return err
			}
			return to.Version(name, &v)
		})
	}
	if err == nil {
		err = each("t/", func(_ string, body []byte, _ *mvccpb.KeyValue) error {
			var t kms.Token
			if err := json.Unmarshal(body, &t); err != nil {
				return err
			}
			return to.Token(&t)
		})
	}
	if err == nil {
		err = each("a/r/", func(rel string, body []byte, _ *mvccpb.KeyValue) error {
			i, err := strconv.ParseUint(strings.TrimPrefix(rel, "a/r/"), 16, 64)
			if err != nil {
				return fmt.Errorf("etcd: malformed row key %q", rel)
			}
			return to.AuditRow(i, body)
		})
	}
	if err != nil {
		return err
	}
	var end, pruned uint64
	for _, k := range []string{s.endK(), s.prunedK()} {
		resp, err := s.get(ctx, k, clientv3.WithRev(rev))
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			continue
		}
		body, err := s.open(k, resp.Kvs[0].Value)
		if err != nil {
			return err
		}
		if k == s.endK() {
			if end, err = strconv.ParseUint(string(body), 16, 64); err != nil {
				return fmt.Errorf("etcd: malformed audit end %q", body)
			}
		} else if len(body) == 8 {
			pruned = binary.BigEndian.Uint64(body)
		} else {
			return fmt.Errorf("etcd: malformed %s", k)
		}
	}
	if err := to.AuditEnd(end, pruned); err != nil {
		return err
	}
	resp, err := s.get(ctx, s.p+"a/c/", clientv3.WithPrefix(), clientv3.WithRev(rev), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend), clientv3.WithLimit(1))
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 1 {
		kv := resp.Kvs[0]
		n, err := strconv.ParseUint(strings.TrimPrefix(string(kv.Key), s.p+"a/c/"), 16, 64)
		if err != nil {
			return fmt.Errorf("etcd: malformed checkpoint key %q", kv.Key)
		}
		note, err := s.open(string(kv.Key), kv.Value)
		if err != nil {
			return err
		}
		if err := to.Checkpoint(n, note); err != nil {
			return err
		}
	}
	type group struct {
		rev  int64
		recs [][]byte
	}
	var groups []group
	err = each("a/q/", func(rel string, body []byte, kv *mvccpb.KeyValue) error {
		rs, err := decodePending(body)
		if err != nil {
			return fmt.Errorf("%w (%s)", err, rel)
		}
		g := group{rev: kv.CreateRevision}
		for _, r := range rs {
			g.recs = append(g.recs, r.Encode())
		}
		groups = append(groups, g)
		return nil
	})
	if err != nil {
		return err
	}
	slices.SortFunc(groups, func(a, b group) int { return int(a.rev - b.rev) })
	for _, g := range groups {
		if err := to.Pending(g.recs); err != nil {
			return err
		}
	}
	return nil
}

// dumped reports whether the record at path goes into a dump: not the
// store's own record key, upgrade mark and digest shards (a store made by
// a load has its own).
func dumped(path string) bool {
	return path != "m/"+storekit.RecordKeyMeta && path != "m/upgrade" && !strings.HasPrefix(path, "m/d/")
}

// ErrTargetNotEmpty: a load into a prefix that holds records.
var ErrTargetNotEmpty = errors.New("the etcd prefix already holds records: a restore goes into an empty prefix (pick another --etcd-prefix, or delete this one); nothing was changed")

// Load implements store.Loader: it marks the prefix (restoringK), opens a
// store there, writes the dump in transactions of about a hundred
// operations, appends the dump's pending records through the audit log,
// and removes the mark last.
func (c *conn) Load(ctx context.Context, sealer kms.Sealer, feed func(store.Sink) error, finish func(store.Backend) error) error {
	p := c.cfg.Etcd.Prefix
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	mark := restoringK(p)
	resp, err := c.cli.Get(ctx, p, clientv3.WithPrefix(), clientv3.WithKeysOnly(), clientv3.WithLimit(1000))
	if err != nil {
		return c.explain(err)
	}
	marked, other := false, false
	for _, kv := range resp.Kvs {
		switch k := string(kv.Key); {
		case k == mark:
			marked = true
		case k == p+"ping" || strings.HasPrefix(k, p+"lead/"):
		default:
			other = true
		}
	}
	if other && !marked {
		return ErrTargetNotEmpty
	}
	if marked {
		// What an interrupted load wrote goes; the mark stays until the
		// end of this one.
		if _, err := c.cli.Txn(ctx).Then(clientv3.OpDelete(p, clientv3.WithRange(mark)), clientv3.OpDelete(mark+"\x00", clientv3.WithRange(clientv3.GetPrefixRangeEnd(p))), clientv3.OpPut(mark, time.Now().UTC().Format(time.RFC3339))).Commit(); err != nil {
			return c.explain(err)
		}
	} else {
		// The mark goes on only if nothing but election keys and pings
		// came meanwhile (a kmsd started on the prefix since the read).
		tr, err := c.cli.Txn(ctx).If(
			clientv3.Compare(clientv3.CreateRevision(p+"a"), "=", 0).WithRange(p+"l"),
			clientv3.Compare(clientv3.CreateRevision(p+"lead0"), "=", 0).WithRange(p+"ping"),
			clientv3.Compare(clientv3.CreateRevision(p+"ping\x00"), "=", 0).WithRange(clientv3.GetPrefixRangeEnd(p)),
		).Then(clientv3.OpPut(mark, time.Now().UTC().Format(time.RFC3339))).Commit()
		if err != nil {
			return c.explain(err)
		}
		if !tr.Succeeded {
			return errors.New("the etcd prefix changed while the restore started (another restore, or a kmsd that started on it); nothing was changed by this one")
		}
	}
	o := Options{Prefix: p, Logger: c.cfg.Logger, Sealer: sealer}
	s, err := Open(ctx, c.cli, o)
	if err != nil {
		return c.explain(err)
	}
	l := &loader{ctx: ctx, s: s, w: s.wtx(), owned: map[string]bool{}}
	err = feed(l)
	if err == nil {
		err = l.flush()
	}
	if err == nil && l.end != l.rowsEnd {
		err = fmt.Errorf("the dump's audit rows end at %d, its end says %d", l.rowsEnd, l.end)
	}
	if cerr := s.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if len(l.pending) > 0 || finish != nil {
		// The pending records, then the caller finishes the store, all
		// before the mark goes.
		if s, err = Open(ctx, c.cli, o); err != nil {
			return c.explain(err)
		}
		if len(l.pending) > 0 {
			err = s.WriteAudit(ctx, l.pending)
			if err == nil {
				err = s.Settle(ctx)
			}
			if err != nil {
				err = fmt.Errorf("append the dump's pending audit records: %w", err)
			}
		}
		if err == nil && finish != nil {
			if err = finish(s); err == nil {
				err = s.Settle(ctx)
			}
		}
		if cerr := s.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	if _, err := c.cli.Delete(ctx, mark); err != nil {
		return c.explain(err)
	}
	return nil
}

// loader writes a dump into a prefix, a transaction at a time.
type loader struct {
	ctx     context.Context
	s       *Store
	w       *wtx
	owned   map[string]bool
	keys    map[string]bool
	end     uint64
	rowsEnd uint64
	pending []*kms.AuditRecord
}

// txnOps is how many operations a load puts in one transaction: under
// etcd's default 128 (--max-txn-ops), with room for a version's indexes.
const txnOps = 64

func (l *loader) flush() error {
	if len(l.w.ops) == 0 {
		return nil
	}
	resp, err := l.s.send(l.ctx, l.w)
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return errors.New("etcd: a restore transaction found the prefix changed under it (another writer?)")
	}
	l.w = l.s.wtx()
	return nil
}

func (l *loader) next() error {
	if len(l.w.ops) >= txnOps {
		return l.flush()
	}
	return nil
}

func (l *loader) Meta(name string, value []byte) error {
	if name == storekit.RecordKeyMeta || name == "upgrade" || strings.HasPrefix(name, "d/") || name == "" {
		return fmt.Errorf("the dump holds a metadata record kmsd does not keep (%q)", name)
	}
	if err := l.w.put(l.s.metaK(name), nil, value); err != nil {
		return err
	}
	return l.next()
}

func (l *loader) Key(k *kms.Key) error {
	if l.keys == nil {
		l.keys = map[string]bool{}
	}
	if l.keys[k.Name] {
		return fmt.Errorf("the dump holds key %q twice", k.Name)
	}
	l.keys[k.Name] = true
	if err := l.w.put(l.s.keyK(k.Name), nil, encode(k)); err != nil {
		return err
	}
	return l.next()
}

func (l *loader) Version(key string, v *kms.Version) error {
	if !l.keys[key] {
		return fmt.Errorf("the dump holds a version of key %q before the key", key)
	}
	if err := l.s.putVersion(l.w, key, v, nil, nil, l.owned); err != nil {
		return err
	}
	return l.next()
}

func (l *loader) Token(t *kms.Token) error {
	if err := l.w.put(l.s.tokenK(t.ID), nil, encode(t)); err != nil {
		return err
	}
	return l.next()
}

func (l *loader) AuditRow(index uint64, row []byte) error {
	if index < l.rowsEnd {
		return fmt.Errorf("the dump's audit rows are out of order at %d", index)
	}
	l.rowsEnd = index + 1
	if err := l.w.put(l.s.rowK(index), nil, row); err != nil {
		return err
	}
	return l.next()
}

func (l *loader) AuditEnd(end, prunedBelow uint64) error {
	if end < l.rowsEnd || prunedBelow > end {
		return fmt.Errorf("the dump's audit end %d (pruned below %d) does not fit its rows", end, prunedBelow)
	}
	l.end = end
	if end > 0 {
		if err := l.w.put(l.s.endK(), nil, []byte(hex16(end))); err != nil {
			return err
		}
	}
	if prunedBelow > 0 {
		if err := l.w.put(l.s.prunedK(), nil, binary.BigEndian.AppendUint64(nil, prunedBelow)); err != nil {
			return err
		}
	}
	return l.next()
}

func (l *loader) Checkpoint(size uint64, note []byte) error {
	if err := l.w.put(l.s.checkpointK(size), nil, note); err != nil {
		return err
	}
	return l.next()
}

func (l *loader) Pending(recs [][]byte) error {
	var err error
	l.pending, err = storekit.AddPending(l.pending, recs)
	return err
}

// Driver names the driver, for a backup's header.
func (s *Store) Driver() string { return "etcd" }
