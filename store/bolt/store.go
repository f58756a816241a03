// Package bolt is the embedded kms.Store: one bbolt file under the data dir,
// fsynced on every commit.
package bolt

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bbolt "go.etcd.io/bbolt"
	bberrors "go.etcd.io/bbolt/errors"

	"github.com/kmsd-project/kmsd/audit/engine"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

// The file's layout (schema 3):
//
//	keys         name -> key header (JSON kms.Key)
//	versions     name 0x00 number(u64 BE) -> version (JSON kms.Version)
//	destroy_due  destroy_at(unix ns, u64 BE) name 0x00 number -> empty
//	blob_owners  blob digest -> key name
//	tokens       id -> token (JSON kms.Token)
//	meta         "schema" -> "3"; "x-..." -> kmsd's own metadata;
//	             "record-key", "digest" (auth.go)
//
// plus the audit buckets (audit.go). Every record carries a tag under the
// file's record key (auth.go). Schema 1 kept every version inside the
// key's record, schema 2 had no tags; Open migrates both (migrate.go,
// auth.go) in one transaction.
var (
	bucketBlobs    = []byte("blob_owners")
	bucketKeys     = []byte("keys")
	bucketVersions = []byte("versions")
	bucketDue      = []byte("destroy_due")
	bucketTokens   = []byte("tokens")
	bucketMeta     = []byte("meta")
	keySchema      = []byte("schema")
)

const schemaVersion = "3"

// ErrLocked is returned by Open when another process holds the file.
var ErrLocked = errors.New("the database is locked by another process (is another kmsd running on this data dir?)")

// Store is a kms.Store on bbolt, holding the rows of its audit log
// (audit/engine, with its write-ahead journal beside the bbolt file).
type Store struct {
	db      *bbolt.DB
	commits atomic.Uint64
	audit   *engine.Log
	// batch is the audit batch of the transaction update runs (guarded by
	// writeMu, which serializes bbolt write transactions).
	batch   *engine.Batch
	writeMu sync.Mutex

	migrated migration

	watchers storekit.Watchers

	auth    *storekit.Auth
	sealer  kms.Sealer
	keyMu   sync.Mutex
	keyRaw  []byte        // the sealed record key as loaded (or sealed again)
	seenSeq atomic.Uint64 // the highest write count a scrub saw
	scrubs  storekit.Scrubs
	obs     storekit.Observed
}

// SetObserver sets who is told of each write transaction (metrics).
func (s *Store) SetObserver(o storekit.Observer) { s.obs.Set(o) }

var _ kms.Store = (*Store)(nil)

// Options tune Open.
type Options struct {
	// LockTimeout bounds the wait for the file lock (default 1s).
	LockTimeout time.Duration
	// AuditWALSize is the size of the audit write-ahead journal file,
	// path + "-audit-wal", preallocated at open (default
	// engine.DefaultWALSize).
	AuditWALSize int64
	// Sealer seals the file's record key (storekit.Auth) under the HSM's
	// KEK; required.
	Sealer kms.Sealer
	// UpgradeUntagged lets Open tag the records of a file written before
	// records had tags (schema 1 or 2, or records and no schema). Without
	// it such a file is refused: it is also what a file forged by
	// whoever can write the data dir looks like.
	UpgradeUntagged bool
}

// Open opens or creates the database file at path.
func Open(path string, o Options) (*Store, error) {
	if o.LockTimeout == 0 {
		o.LockTimeout = time.Second
	}
	if o.Sealer == nil {
		return nil, errors.New("bolt: Options.Sealer is required (it seals the record key)")
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: o.LockTimeout})
	if errors.Is(err, bberrors.ErrTimeout) {
		return nil, fmt.Errorf("open %s: %w", path, ErrLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	var mig migration
	var auth *storekit.Auth
	err = db.Update(func(tx *bbolt.Tx) error {
		var schema []byte
		if m := tx.Bucket(bucketMeta); m != nil {
			schema = m.Get(keySchema)
		}
		if schema != nil && string(schema) != "1" && string(schema) != "2" && string(schema) != schemaVersion {
			return fmt.Errorf("database schema %q is not the supported %q (a newer kmsd's file?)", schema, schemaVersion)
		}
		if string(schema) == "1" {
			// Checked before any bucket is made: a schema-1 file that
			// already has version records was changed by something else.
			if b := tx.Bucket(bucketVersions); b != nil {
				if k, _ := b.Cursor().First(); k != nil {
					return errors.New("the file says schema 1 but already holds version records (half-migrated?); refusing to start: restore it from a backup")
				}
			}
		}
		for _, b := range [][]byte{bucketKeys, bucketVersions, bucketDue, bucketTokens, bucketMeta, bucketAuditRecords, bucketAuditCheckpoints, bucketBlobs} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		var n int
		var err error
		if auth, n, err = openAuth(tx, o.Sealer, string(schema), o.UpgradeUntagged); err != nil {
			return err
		}
		if schema != nil && string(schema) != schemaVersion {
			mig = migration{From: string(schema), To: schemaVersion, Records: n}
		}
		if string(schema) == "1" {
			r := &rtx{Tx: tx, a: auth}
			if err := migrateV1(r, &mig); err != nil {
				return fmt.Errorf("migrate schema 1 to %s: %w", schemaVersion, err)
			}
			if err := r.finish(); err != nil {
				return err
			}
		}
		if string(schema) != schemaVersion {
			return tx.Bucket(bucketMeta).Put(keySchema, []byte(schemaVersion))
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialize %s: %w", path, err)
	}
	s := &Store{db: db, migrated: mig, auth: auth, sealer: o.Sealer}
	// Spool files of dumps a crash interrupted (this process holds the
	// file's lock: no dump of another runs).
	if old, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".dump-spool-*")); len(old) > 0 {
		for _, f := range old {
			os.Remove(f)
		}
	}
	if err := db.View(func(tx *bbolt.Tx) error {
		s.keyRaw = bytes.Clone(tx.Bucket(bucketMeta).Get(keyRecordKey))
		return nil
	}); err != nil {
		db.Close()
		return nil, err
	}
	// Checked before anything acts on the file: at every start.
	if _, err := s.Scrub(context.Background()); err != nil {
		db.Close()
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s.audit = engine.New(s, engine.Options{JournalPath: path + "-audit-wal", JournalSize: o.AuditWALSize})
	if err := s.audit.Start(context.Background()); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// Meta returns a value of the store's own metadata (nil if unset).
func (s *Store) Meta(key string) ([]byte, error) {
	var v []byte
	err := s.db.View(func(tx *bbolt.Tx) error {
		body, err := get(s.auth, tx, bucketMeta, []byte("x-"+key))
		v = bytes.Clone(body)
		return err
	})
	return v, err
}

// PutMeta sets a value of the store's own metadata, durably.
func (s *Store) PutMeta(key string, value []byte) error {
	return s.update(func(r *rtx) error { return r.put(bucketMeta, []byte("x-"+key), value) })
}

// ClaimMeta sets a value of the store's own metadata unless it is set, and
// returns the value stored: value if this call set it.
func (s *Store) ClaimMeta(key string, value []byte) ([]byte, error) {
	var got []byte
	err := s.update(func(r *rtx) error {
		v, err := r.get(bucketMeta, []byte("x-"+key))
		if err != nil || v != nil {
			got = bytes.Clone(v)
			return err
		}
		got = value
		return r.put(bucketMeta, []byte("x-"+key), value)
	})
	return got, err
}

// Empty reports whether the store holds no key and no token: a new data
// dir.
func (s *Store) Empty() (bool, error) {
	empty := false
	err := s.db.View(func(tx *bbolt.Tx) error {
		k, _ := tx.Bucket(bucketKeys).Cursor().First()
		t, _ := tx.Bucket(bucketTokens).Cursor().First()
		empty = k == nil && t == nil
		return nil
	})
	return empty, err
}

// Close stops the audit log (moving the records waiting in its journal
// into bbolt; if that fails they stay in the journal and are copied at the
// next open) and closes the file.
func (s *Store) Close() error {
	err := s.audit.Close()
	if cerr := s.db.Close(); err == nil {
		err = cerr
	}
	return err
}

// update runs fn in a write transaction and counts the commit. If fn staged
// audit records (appendAudit), the audit log learns how the transaction
// ended, before the next one starts.
func (s *Store) update(fn func(r *rtx) error) (err error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	rolledBack := false // fn refused the change (a 400, a lost guard): not a store failure
	defer func(start time.Time) {
		outcome := storekit.Outcome(err)
		if rolledBack {
			outcome = "rollback"
		}
		s.obs.Done(start, outcome)
	}(time.Now())
	tx, err := s.db.Begin(true)
	if err != nil {
		return err
	}
	committed := false
	defer func() { // also on a panic in fn, which then goes on up
		if !committed {
			_ = tx.Rollback() // ErrTxClosed if a failed Commit rolled back already
			if err == nil {
				err = errors.New("transaction did not commit")
			}
		}
		if s.batch != nil {
			s.batch.Done(err)
			s.batch = nil
		}
	}()
	r := &rtx{Tx: tx, a: s.auth}
	if err := fn(r); err != nil {
		rolledBack = true
		return err
	}
	if err := r.finish(); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	committed = true
	s.commits.Add(1)
	return nil
}

// Path is the file's path.
func (s *Store) Path() string { return s.db.Path() }

// Check runs bbolt's consistency check and returns the first problem found.
func (s *Store) Check() error {
	return s.db.View(func(tx *bbolt.Tx) error {
		var first error
		for err := range tx.Check() { // drain: Check's goroutine sends every problem
			if first == nil {
				first = err
			}
		}
		return first
	})
}

// Ping checks that the file can be read.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.auth.Check(); err != nil {
		return err
	}
	return s.db.View(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketKeys) == nil {
			return errors.New("keys bucket missing")
		}
		return nil
	})
}

func notFound(what, name string) error {
	return &kms.Error{Kind: kms.KindNotFound, Msg: fmt.Sprintf("%s %q not found", what, name)}
}

func exists(what, name string) error {
	return &kms.Error{Kind: kms.KindAlreadyExists, Msg: fmt.Sprintf("%s %q already exists", what, name)}
}

// Watch implements kms.Store.
func (s *Store) Watch(fn func([]kms.Change)) { s.watchers.Watch(fn) }

// changed tells the watchers what a committed transaction wrote.
func (s *Store) changed(chs []kms.Change) { s.watchers.Notify(chs) }

// versionKey is the versions bucket's key of version n of a key.
func versionKey(name string, n uint64) []byte {
	b := make([]byte, 0, len(name)+9)
	b = append(b, name...)
	b = append(b, 0)
	return binary.BigEndian.AppendUint64(b, n)
}

// dueKey is the destroy_due bucket's key of a scheduled version.
func dueKey(at time.Time, name string, n uint64) []byte {
	b := binary.BigEndian.AppendUint64(nil, uint64(max(at.UnixNano(), 0)))
	return append(b, versionKey(name, n)...)
}

// CreateKey implements kms.Store.
func (s *Store) CreateKey(ctx context.Context, k *kms.Key, v *kms.Version, audit []*kms.AuditRecord) error {
	if v.Number != 1 || k.Latest != 1 {
		return errors.New("a new key has version 1 only")
	}
	err := s.update(func(r *rtx) error {
		if r.Bucket(bucketKeys).Get([]byte(k.Name)) != nil {
			return exists("key", k.Name)
		}
		if err := putHeader(r, k); err != nil {
			return err
		}
		if err := putVersion(r, k.Name, v, nil); err != nil {
			return err
		}
		return s.appendAudit(ctx, r, audit, false)
	})
	if err == nil {
		s.changed([]kms.Change{{Key: k.Name}, {Key: k.Name, Version: 1}})
	}
	return err
}

func putHeader(r *rtx, k *kms.Key) error {
	buf, err := json.Marshal(k)
	if err != nil {
		return err
	}
	return r.put(bucketKeys, []byte(k.Name), buf)
}

// putVersion writes a version record, moves its destroy-schedule entry
// (old is the DestroyAt it was indexed under, nil if none) and indexes its
// blobs.
func putVersion(r *rtx, name string, v *kms.Version, old *time.Time) error {
	buf, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if err := r.put(bucketVersions, versionKey(name, v.Number), buf); err != nil {
		return err
	}
	at := storekit.ScheduledAt(v)
	if old != nil && (at == nil || !at.Equal(*old)) {
		if err := r.del(bucketDue, dueKey(*old, name, v.Number)); err != nil {
			return err
		}
	}
	if at != nil && (old == nil || !at.Equal(*old)) {
		if err := r.put(bucketDue, dueKey(*at, name, v.Number), nil); err != nil {
			return err
		}
	}
	blobs := r.Bucket(bucketBlobs)
	for _, d := range v.Blobs {
		if blobs.Get([]byte(d)) == nil {
			if err := r.put(bucketBlobs, []byte(d), []byte(name)); err != nil {
				return err
			}
		}
	}
	return nil
}

func decodeKey(buf []byte) (*kms.Key, error) {
	var k kms.Key
	if err := json.Unmarshal(buf, &k); err != nil {
		return nil, fmt.Errorf("decode key record: %w", err)
	}
	return &k, nil
}

// GetKey implements kms.Store.
func (s *Store) GetKey(ctx context.Context, name string) (*kms.Key, error) {
	var k *kms.Key
	err := s.db.View(func(tx *bbolt.Tx) error {
		buf, err := get(s.auth, tx, bucketKeys, []byte(name))
		if err != nil {
			return err
		}
		if buf == nil {
			return notFound("key", name)
		}
		k, err = decodeKey(buf)
		return err
	})
	return k, err
}

// GetVersion implements kms.Store.
func (s *Store) GetVersion(ctx context.Context, name string, n uint64) (*kms.Version, error) {
	var v *kms.Version
	err := s.db.View(func(tx *bbolt.Tx) error {
		buf, err := get(s.auth, tx, bucketVersions, versionKey(name, n))
		if err != nil {
			return err
		}
		if buf == nil {
			return &kms.Error{Kind: kms.KindNotFound, Msg: fmt.Sprintf("key %q has no version %d", name, n)}
		}
		v, err = storekit.DecodeVersion(buf)
		return err
	})
	return v, err
}

// ListKeys implements kms.Store.
func (s *Store) ListKeys(ctx context.Context, after string, limit int) ([]*kms.Key, error) {
	return listAfter(s, bucketKeys, after, limit, decodeKey)
}

// ListVersions implements kms.Store.
func (s *Store) ListVersions(ctx context.Context, name string, before uint64, limit int) (*kms.Key, []*kms.Version, error) {
	var out []*kms.Version
	var hdr *kms.Key
	err := s.db.View(func(tx *bbolt.Tx) error {
		buf, err := get(s.auth, tx, bucketKeys, []byte(name))
		if err != nil {
			return err
		}
		if buf == nil {
			return notFound("key", name)
		}
		k, err := decodeKey(buf)
		if err != nil {
			return err
		}
		hdr = k
		n := k.Latest
		if before != 0 && before-1 < n {
			n = before - 1
		}
		for ; n >= 1 && len(out) < limit; n-- {
			buf, err := get(s.auth, tx, bucketVersions, versionKey(name, n))
			if err != nil {
				return err
			}
			if buf == nil {
				return fmt.Errorf("key %q: version record %d of %d is missing", name, n, k.Latest)
			}
			v, err := storekit.DecodeVersion(buf)
			if err != nil {
				return err
			}
			out = append(out, v)
		}
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	return hdr, out, nil
}

// DueVersions implements kms.Store.
func (s *Store) DueVersions(ctx context.Context, now time.Time, limit int) ([]kms.VersionRef, error) {
	var out []kms.VersionRef
	end := uint64(max(now.UnixNano(), 0))
	err := s.db.View(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketDue).Cursor()
		for k, v := c.First(); k != nil && len(out) < limit; k, v = c.Next() {
			if len(k) < 8+1+8 || binary.BigEndian.Uint64(k) > end {
				break
			}
			if _, _, err := s.auth.Open(recPath(bucketDue, k), v); err != nil {
				return err
			}
			rest := k[8:]
			out = append(out, kms.VersionRef{Key: string(rest[:len(rest)-9]), Version: binary.BigEndian.Uint64(rest[len(rest)-8:])})
		}
		return nil
	})
	return out, err
}

// listAfter decodes up to limit values of bucket whose keys sort after
// `after`, in key order.
func listAfter[T any](s *Store, bucket []byte, after string, limit int, decode func([]byte) (*T, error)) ([]*T, error) {
	var out []*T
	err := s.db.View(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucket).Cursor()
		var k, v []byte
		if after == "" {
			k, v = c.First()
		} else {
			k, v = c.Seek([]byte(after))
			if k != nil && bytes.Equal(k, []byte(after)) {
				k, v = c.Next()
			}
		}
		for ; k != nil && len(out) < limit; k, v = c.Next() {
			body, _, err := s.auth.Open(recPath(bucket, k), v)
			if err != nil {
				return err
			}
			x, err := decode(body)
			if err != nil {
				return err
			}
			out = append(out, x)
		}
		return nil
	})
	return out, err
}

// UpdateKey implements kms.Store.
func (s *Store) UpdateKey(ctx context.Context, name string, fn func(kms.KeyTx) ([]*kms.AuditRecord, error)) error {
	var audit []*kms.AuditRecord
	var chs []kms.Change
	err := s.update(func(r *rtx) error {
		chs = chs[:0]
		buf, err := r.get(bucketKeys, []byte(name))
		if err != nil {
			return err
		}
		if buf == nil {
			return notFound("key", name)
		}
		k, err := decodeKey(buf)
		if err != nil {
			return err
		}
		kt := storekit.NewKeyTx(k, func(n uint64) ([]byte, error) { return r.get(bucketVersions, versionKey(name, n)) })
		if audit, err = fn(kt); err != nil {
			return err
		}
		if err := kt.Check(name); err != nil {
			return err
		}
		if err := putHeader(r, k); err != nil {
			return err
		}
		chs = append(chs, kms.Change{Key: name})
		for n, v := range kt.Loaded {
			if err := putVersion(r, name, v, kt.Due[n]); err != nil {
				return err
			}
			chs = append(chs, kms.Change{Key: name, Version: n})
		}
		for _, v := range kt.Added {
			if err := putVersion(r, name, v, nil); err != nil {
				return err
			}
			chs = append(chs, kms.Change{Key: name, Version: v.Number})
		}
		return s.appendAudit(ctx, r, audit, false)
	})
	if err == nil {
		s.changed(chs)
	}
	return err
}

// CreateToken implements kms.Store.
func (s *Store) CreateToken(ctx context.Context, t *kms.Token, audit []*kms.AuditRecord) error {
	return s.createToken(ctx, t, audit, false)
}

// CreateFirstToken implements kms.Store.
func (s *Store) CreateFirstToken(ctx context.Context, t *kms.Token, audit []*kms.AuditRecord) error {
	return s.createToken(ctx, t, audit, true)
}

func (s *Store) createToken(ctx context.Context, t *kms.Token, audit []*kms.AuditRecord, first bool) error {
	buf, err := json.Marshal(t)
	if err != nil {
		return err
	}
	err = s.update(func(r *rtx) error {
		b := r.Bucket(bucketTokens)
		if first {
			if k, _ := b.Cursor().First(); k != nil {
				return exists("token", "(a first one)")
			}
		}
		if b.Get([]byte(t.ID)) != nil {
			return exists("token", t.ID)
		}
		if err := r.put(bucketTokens, []byte(t.ID), buf); err != nil {
			return err
		}
		return s.appendAudit(ctx, r, audit, false)
	})
	if err == nil {
		s.changed([]kms.Change{{Token: t.ID}})
	}
	return err
}

// GetToken implements kms.Store.
func (s *Store) GetToken(ctx context.Context, id string) (*kms.Token, error) {
	var t kms.Token
	err := s.db.View(func(tx *bbolt.Tx) error {
		buf, err := get(s.auth, tx, bucketTokens, []byte(id))
		if err != nil {
			return err
		}
		if buf == nil {
			return notFound("token", id)
		}
		return json.Unmarshal(buf, &t)
	})
	if err != nil {
		return nil, err
	}
	return &t, nil
}

// ListTokens implements kms.Store.
func (s *Store) ListTokens(ctx context.Context, after string, limit int) ([]*kms.Token, error) {
	return listAfter(s, bucketTokens, after, limit, decodeToken)
}

func decodeToken(buf []byte) (*kms.Token, error) {
	var t kms.Token
	if err := json.Unmarshal(buf, &t); err != nil {
		return nil, fmt.Errorf("decode token record: %w", err)
	}
	return &t, nil
}

// UpdateToken implements kms.Store.
func (s *Store) UpdateToken(ctx context.Context, id string, fn func(t *kms.Token) ([]*kms.AuditRecord, error)) error {
	var audit []*kms.AuditRecord
	err := s.update(func(r *rtx) error {
		buf, err := r.get(bucketTokens, []byte(id))
		if err != nil {
			return err
		}
		if buf == nil {
			return notFound("token", id)
		}
		var t kms.Token
		if err := json.Unmarshal(buf, &t); err != nil {
			return fmt.Errorf("decode token record: %w", err)
		}
		if audit, err = fn(&t); err != nil {
			return err
		}
		if t.ID != id {
			return errors.New("a token's id cannot change")
		}
		out, err := json.Marshal(&t)
		if err != nil {
			return err
		}
		if err := r.put(bucketTokens, []byte(id), out); err != nil {
			return err
		}
		return s.appendAudit(ctx, r, audit, false)
	})
	if err == nil {
		s.changed([]kms.Change{{Token: id}})
	}
	return err
}

// DeleteTokens implements kms.Store.
func (s *Store) DeleteTokens(ctx context.Context, ids []string, audit []*kms.AuditRecord) error {
	err := s.update(func(r *rtx) error {
		for _, id := range ids {
			if err := r.del(bucketTokens, []byte(id)); err != nil {
				return err
			}
		}
		return s.appendAudit(ctx, r, audit, false)
	})
	if err == nil {
		chs := make([]kms.Change, len(ids))
		for i, id := range ids {
			chs[i] = kms.Change{Token: id}
		}
		s.changed(chs)
	}
	return err
}

// RecordTokenUse implements kms.Store.
func (s *Store) RecordTokenUse(ctx context.Context, used map[string]time.Time) error {
	var chs []kms.Change
	err := s.update(func(r *rtx) error {
		chs = chs[:0]
		for id, at := range used {
			buf, err := r.get(bucketTokens, []byte(id))
			if err != nil {
				return err
			}
			if buf == nil {
				continue
			}
			var t kms.Token
			if err := json.Unmarshal(buf, &t); err != nil {
				return fmt.Errorf("decode token record: %w", err)
			}
			if t.LastUsedAt != nil && !at.After(*t.LastUsedAt) {
				continue
			}
			at := at
			t.LastUsedAt = &at
			out, err := json.Marshal(&t)
			if err != nil {
				return err
			}
			if err := r.put(bucketTokens, []byte(id), out); err != nil {
				return err
			}
			chs = append(chs, kms.Change{Token: id})
		}
		return nil
	})
	if err == nil {
		s.changed(chs)
	}
	return err
}

// CountTokens implements kms.Store.
func (s *Store) CountTokens(ctx context.Context) (int, error) {
	n := 0
	err := s.db.View(func(tx *bbolt.Tx) error {
		n = tx.Bucket(bucketTokens).Stats().KeyN
		return nil
	})
	return n, err
}

// BlobOwner implements kms.Store.
func (s *Store) BlobOwner(ctx context.Context, digest string) (string, error) {
	var name string
	err := s.db.View(func(tx *bbolt.Tx) error {
		v, err := get(s.auth, tx, bucketBlobs, []byte(digest))
		if err != nil {
			return err
		}
		if v == nil {
			return notFound("blob", digest)
		}
		name = string(v)
		return nil
	})
	return name, err
}
