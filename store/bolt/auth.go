package bolt

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	bbolt "go.etcd.io/bbolt"
	bberrors "go.etcd.io/bbolt/errors"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

// Every record in the file is authenticated (storekit.Auth): its path is
// "<bucket>/<key>". The meta bucket also holds, outside the records,
//
//	"schema"      the file's schema
//	"record-key"  the record key, sealed under the HSM's KEK
//	"digest"      the store digest (a record of its own, not digested)
var (
	keyRecordKey = []byte(storekit.RecordKeyMeta)
	keyDigest    = []byte("digest")
	// keyAuditEnd is the audit log's end (u64): a record, digested,
	// written with the rows, so that rows cut off the end are found.
	keyAuditEnd = []byte("audit-end")
	// keyAuditPruned is the index below which the audit log's rows may
	// be absent (u64): pruned to the archive (retention). Digested, so
	// that it is not moved to hide rows deleted outside kmsd.
	keyAuditPruned = []byte("audit-pruned")
)

func recPath(bucket, key []byte) string { return string(bucket) + "/" + string(key) }

// digested reports whether a record counts in the store digest: all but
// the audit log's rows and checkpoints (its tree and signed checkpoints
// cover them, and they grow without end) and the meta bucket's own keys.
func digested(bucket, key []byte) bool {
	switch {
	case bytes.Equal(bucket, bucketAuditRecords), bytes.Equal(bucket, bucketAuditCheckpoints):
		return false
	case bytes.Equal(bucket, bucketMeta):
		return bytes.HasPrefix(key, []byte("x-")) || bytes.Equal(key, keyAuditEnd) || bytes.Equal(key, keyAuditPruned)
	}
	return true
}

// rtx is a write transaction over authenticated records: it writes each
// record's tag and moves the store digest in the same transaction.
type rtx struct {
	*bbolt.Tx
	a     *storekit.Auth
	delta storekit.Digest
	wrote bool
}

// get returns the body of the record at bucket/key, nil if absent; a
// record that fails its check is a tamper error. The body is valid for
// the transaction only.
func get(a *storekit.Auth, tx *bbolt.Tx, bucket, key []byte) ([]byte, error) {
	// A broken store answers no read, not even "not found".
	if err := a.Check(); err != nil {
		return nil, err
	}
	raw := tx.Bucket(bucket).Get(key)
	if raw == nil {
		return nil, nil
	}
	body, _, err := a.Open(recPath(bucket, key), raw)
	return body, err
}

func (r *rtx) get(bucket, key []byte) ([]byte, error) { return get(r.a, r.Tx, bucket, key) }

// put writes body as the record at bucket/key.
func (r *rtx) put(bucket, key, body []byte) error {
	b := r.Bucket(bucket)
	var delta storekit.Digest
	stored, err := r.a.Put(&delta, recPath(bucket, key), b.Get(key), body)
	if err != nil {
		return err
	}
	if digested(bucket, key) {
		r.delta.Plus(delta)
		r.wrote = true
	}
	return b.Put(key, stored)
}

// del deletes the record at bucket/key, if there is one.
func (r *rtx) del(bucket, key []byte) error {
	b := r.Bucket(bucket)
	old := b.Get(key)
	if old == nil {
		return nil
	}
	var delta storekit.Digest
	if err := r.a.Delete(&delta, recPath(bucket, key), old); err != nil {
		return err
	}
	if digested(bucket, key) {
		r.delta.Plus(delta)
		r.wrote = true
	}
	return b.Delete(key)
}

// finish writes the store digest moved by the transaction's writes.
func (r *rtx) finish() error {
	if !r.wrote {
		return nil
	}
	d, seq, err := readDigest(r.a, r.Tx)
	if err != nil {
		return err
	}
	d.Plus(r.delta)
	return r.Bucket(bucketMeta).Put(keyDigest, r.a.Seal(recPath(bucketMeta, keyDigest), seq+1, d.Bytes()))
}

func readDigest(a *storekit.Auth, tx *bbolt.Tx) (storekit.Digest, uint64, error) {
	raw := tx.Bucket(bucketMeta).Get(keyDigest)
	if raw == nil {
		return storekit.Digest{}, 0, a.Tamper(recPath(bucketMeta, keyDigest), "the store digest is missing")
	}
	body, seq, err := a.Open(recPath(bucketMeta, keyDigest), raw)
	if err != nil {
		return storekit.Digest{}, 0, err
	}
	d, err := storekit.ParseDigest(body)
	if err != nil {
		return d, 0, a.Tamper(recPath(bucketMeta, keyDigest), err.Error())
	}
	return d, seq, nil
}

// authBuckets are the buckets whose every record is authenticated.
var authBuckets = [][]byte{bucketKeys, bucketVersions, bucketDue, bucketBlobs, bucketTokens, bucketMeta, bucketAuditRecords, bucketAuditCheckpoints}

// openAuth loads the file's record key inside Open's transaction, or makes
// one: for a new file, or for a file of schema 1 or 2, whose records it
// then authenticates, all in the one transaction that migrates the file.
func openAuth(tx *bbolt.Tx, sealer kms.Sealer, schema string, upgrade bool) (*storekit.Auth, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m := tx.Bucket(bucketMeta)
	sealed := m.Get(keyRecordKey)
	if schema == schemaVersion {
		if sealed == nil {
			return nil, 0, errors.New("the file's record key is missing (it was deleted from the meta bucket); kmsd cannot trust any record in it: restore the file from a backup")
		}
		a, err := storekit.OpenRecordKey(ctx, sealer, bytes.Clone(sealed))
		return a, 0, err
	}
	if sealed != nil {
		return nil, 0, fmt.Errorf("the file says schema %q but holds a record key (schema %s): its schema was rolled back; refusing to start: restore it from a backup", schema, schemaVersion)
	}
	if (schema != "" || holdsRecords(tx)) && !upgrade {
		return nil, 0, ErrUntagged
	}
	a, sealed, err := storekit.NewRecordKey(ctx, sealer)
	if err != nil {
		return nil, 0, err
	}
	// Records of schema 1 and 2 carry no tag: each gets one (seq 1), and
	// the digest their terms.
	var d storekit.Digest
	n := 0
	for _, name := range authBuckets {
		b := tx.Bucket(name)
		type kv struct{ k, v []byte }
		var all []kv
		err := b.ForEach(func(k, v []byte) error {
			if bytes.Equal(name, bucketMeta) && !bytes.HasPrefix(k, []byte("x-")) {
				return nil // schema
			}
			all = append(all, kv{bytes.Clone(k), bytes.Clone(v)})
			return nil
		})
		if err != nil {
			return nil, 0, err
		}
		for _, r := range all {
			stored := a.Seal(recPath(name, r.k), 1, r.v)
			if digested(name, r.k) {
				d.Plus(a.Term(stored))
			}
			if err := b.Put(r.k, stored); err != nil {
				return nil, 0, err
			}
			n++
		}
	}
	end, err := auditSize(tx)
	if err != nil {
		return nil, 0, err
	}
	stored := a.Seal(recPath(bucketMeta, keyAuditEnd), 1, u64(end))
	d.Plus(a.Term(stored))
	if err := m.Put(keyAuditEnd, stored); err != nil {
		return nil, 0, err
	}
	if err := m.Put(keyRecordKey, sealed); err != nil {
		return nil, 0, err
	}
	if err := m.Put(keyDigest, a.Seal(recPath(bucketMeta, keyDigest), 1, d.Bytes())); err != nil {
		return nil, 0, err
	}
	return a, n, nil
}

// Integrity is what a store's scrubs and reads found.
type Integrity = storekit.Integrity

// Scrub checks every digested record's tag and that their terms sum to the
// store digest, in one read transaction. If they do not, every later read
// fails (the store is broken until kmsd restarts on a store that passes).
func (s *Store) Scrub(ctx context.Context) (storekit.ScrubReport, error) {
	start := time.Now()
	var rep storekit.ScrubReport
	err := s.db.View(func(tx *bbolt.Tx) error { return s.scrubTx(ctx, tx, &rep) })
	rep.Took = time.Since(start)
	s.scrubs.Note(rep, err)
	if t := storekit.AsTamper(err); t != nil {
		s.auth.Break(t)
	}
	if err == nil {
		storekit.Raise(&s.seenSeq, rep.Seq)
	}
	return rep, err
}

// scrubTx is a scrub inside the read transaction tx (Scrub's, or a
// dump's: a backup is only taken of a store that adds up).
func (s *Store) scrubTx(ctx context.Context, tx *bbolt.Tx, rep *storekit.ScrubReport) error {
	{
		var sum storekit.Digest
		for _, name := range authBuckets {
			b := tx.Bucket(name)
			err := b.ForEach(func(k, v []byte) error {
				if !digested(name, k) {
					return nil
				}
				if _, _, err := s.auth.Open(recPath(name, k), v); err != nil {
					return err
				}
				sum.Plus(s.auth.Term(v))
				rep.Records++
				return nil
			})
			if err != nil {
				return err
			}
		}
		if !s.sameRecordKey(ctx, tx.Bucket(bucketMeta).Get(keyRecordKey)) {
			return s.auth.Tamper(recPath(bucketMeta, keyRecordKey), "the record key is not the one loaded at start")
		}
		if err := checkAuditEnd(s.auth, tx); err != nil {
			return err
		}
		d, seq, err := readDigest(s.auth, tx)
		if err != nil {
			return err
		}
		rep.Seq = seq
		if d != sum {
			return s.auth.Tamper(recPath(bucketMeta, keyDigest), "the records do not sum to the store digest: one was put back, deleted or added outside kmsd")
		}
		if seen := s.seenSeq.Load(); seq < seen {
			return s.auth.Tamper(recPath(bucketMeta, keyDigest), fmt.Sprintf("the store went back from write %d to write %d (the file was replaced by an earlier copy)", seen, seq))
		}
		return nil
	}
}

// Integrity reports the scrubs and the records refused.
func (s *Store) Integrity() Integrity { return s.scrubs.Report(s.auth) }

// Peek reads what kmsd needs before it opens the HSM, without the record
// key: the metadata value key (its tag unchecked: Open checks every
// record) and whether the file holds no key and no token (true for a file
// not made yet, which it does not make). It opens the file read-only, so
// it fails with ErrLocked while another process has it open.
func Peek(path, key string, o Options) (value []byte, empty bool, err error) {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil, true, nil
	}
	if o.LockTimeout == 0 {
		o.LockTimeout = time.Second
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: o.LockTimeout, ReadOnly: true})
	if errors.Is(err, bberrors.ErrTimeout) {
		return nil, false, fmt.Errorf("open %s: %w", path, ErrLocked)
	}
	if err != nil {
		return nil, false, fmt.Errorf("open %s: %w", path, err)
	}
	defer db.Close()
	err = db.View(func(tx *bbolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if m == nil {
			empty = true
			return nil
		}
		raw := m.Get([]byte("x-" + key))
		if string(m.Get(keySchema)) == schemaVersion {
			raw = storekit.Unverified(raw)
		}
		value = bytes.Clone(raw)
		empty = true
		for _, b := range [][]byte{bucketKeys, bucketTokens} {
			if bk := tx.Bucket(b); bk != nil {
				if k, _ := bk.Cursor().First(); k != nil {
					empty = false
				}
			}
		}
		return nil
	})
	return value, empty, err
}

// ErrUntagged: the file holds records without tags.
var ErrUntagged = errors.New("kms.db holds records without tags: written by a kmsd from before records had tags, or forged by whoever can write the data dir; check it is the file you expect, then start kmsd once with --upgrade-untagged-store to tag its records (README: Storage trust)")

// holdsRecords reports whether any bucket holds a record (the schema
// aside).
func holdsRecords(tx *bbolt.Tx) bool {
	found := false
	_ = tx.ForEach(func(name []byte, b *bbolt.Bucket) error {
		k, _ := b.Cursor().First()
		if k != nil && !(bytes.Equal(name, bucketMeta) && bytes.Equal(k, keySchema) && b.Stats().KeyN == 1) {
			found = true
		}
		return nil
	})
	return found
}

// checkAuditEnd checks that the audit log's rows end where its end record
// says (so rows cut off the end, or added past it, are found).
func checkAuditEnd(a *storekit.Auth, tx *bbolt.Tx) error {
	p := recPath(bucketMeta, keyAuditEnd)
	raw := tx.Bucket(bucketMeta).Get(keyAuditEnd)
	if raw == nil {
		return a.Tamper(p, "the audit log's end record is missing")
	}
	body, _, err := a.Open(p, raw)
	if err != nil {
		return err
	}
	size, err := auditSize(tx)
	if err != nil {
		return err
	}
	if len(body) != 8 || binary.BigEndian.Uint64(body) != size {
		return a.Tamper(p, fmt.Sprintf("the audit log's rows end at %d, not where its end record says", size))
	}
	return nil
}

// sameRecordKey reports whether sealed is the record key the file was
// opened with: the bytes loaded, or the same key sealed again under
// another KEK (a KEK rotation), which it then takes as the bytes.
func (s *Store) sameRecordKey(ctx context.Context, sealed []byte) bool {
	s.keyMu.Lock()
	defer s.keyMu.Unlock()
	if bytes.Equal(sealed, s.keyRaw) {
		return true
	}
	if sealed == nil || !s.auth.SameRecordKey(ctx, s.sealer, sealed) {
		return false
	}
	s.keyRaw = bytes.Clone(sealed)
	return true
}

// ResealRecordKey seals the file's record key again under the sealer's
// primary KEK (a KEK rotation); false if it was under the primary
// already.
func (s *Store) ResealRecordKey(ctx context.Context) (bool, error) {
	var next []byte
	err := s.update(func(r *rtx) error {
		m := r.Bucket(bucketMeta)
		var err error
		if next, err = s.auth.ResealRecordKey(ctx, s.sealer, bytes.Clone(m.Get(keyRecordKey))); err != nil || next == nil {
			return err
		}
		// Not a tagged record: the key that checks the tags.
		return m.Put(keyRecordKey, next)
	})
	if err != nil || next == nil {
		return false, err
	}
	s.keyMu.Lock()
	s.keyRaw = next
	s.keyMu.Unlock()
	return true, nil
}

// RecordKeyKEK is the KEK the file's record key is sealed under.
func (s *Store) RecordKeyKEK(ctx context.Context) (string, error) {
	var sealed []byte
	if err := s.db.View(func(tx *bbolt.Tx) error {
		sealed = bytes.Clone(tx.Bucket(bucketMeta).Get(keyRecordKey))
		return nil
	}); err != nil {
		return "", err
	}
	return storekit.RecordKeyKEK(s.sealer, sealed)
}
