package kms

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"sync"
	"time"
)

// Job is a long HE keyset generation running in the background. Jobs live in
// memory: after a restart the interrupted ones are gone, and so is anything
// they had not committed (no half version; their blobs are removed at
// start).
type Job struct {
	ID      string
	State   string // "running", "succeeded", "failed"
	Done    int
	Total   int
	Bytes   int64
	Error   string // caller-safe message when failed
	Key     string
	Version uint64 // the new version, once succeeded
	Started time.Time
}

type jobs struct {
	mu sync.Mutex
	m  map[string]*Job
}

// asyncWanted reports whether a key of this kind and policy has a keyset
// larger than Config.AsyncKeysetBytes (default 64 MiB), which CreateKeyAsync
// and RotateAsync generate in the background.
func (s *Service) asyncWanted(kind KeyKind, p Policy) bool {
	kk, ok := kind.(KeysetKind)
	if !ok {
		return false
	}
	_, size, err := kk.CheckPolicy(p)
	return err == nil && size > s.asyncBytes
}

func (s *Service) newJob(key string) *Job {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	j := &Job{ID: hex.EncodeToString(b), State: "running", Key: key, Started: s.clock.Now()}
	s.jobs.mu.Lock()
	s.jobs.m[j.ID] = j
	// Keep finished jobs for a while, not forever.
	for id, o := range s.jobs.m {
		if o.State != "running" && s.clock.Now().Sub(o.Started) > 24*time.Hour {
			delete(s.jobs.m, id)
		}
	}
	s.jobs.mu.Unlock()
	return j
}

// GetJob returns a copy of a job.
func (s *Service) GetJob(id string) (*Job, error) {
	s.jobs.mu.Lock()
	defer s.jobs.mu.Unlock()
	j, ok := s.jobs.m[id]
	if !ok {
		return nil, Errorf(KindNotFound, "no such operation (operations are kept in memory and end with a restart)")
	}
	c := *j
	return &c, nil
}

func (s *Service) jobProgress(j *Job) func(done, total int, bytes int64) {
	return func(done, total int, bytes int64) {
		s.jobs.mu.Lock()
		j.Done, j.Total, j.Bytes = done, total, bytes
		s.jobs.mu.Unlock()
	}
}

func (s *Service) finishJob(j *Job, version uint64, err error) {
	s.jobs.mu.Lock()
	defer s.jobs.mu.Unlock()
	if err != nil {
		j.State, j.Error = "failed", PublicMessage(err)
		s.log.Error("operation failed", "operation", j.ID, "key", j.Key, "err", err)
		return
	}
	j.State, j.Version = "succeeded", version
}

type progressKey struct{}

func progressFrom(ctx context.Context) func(done, total int, bytes int64) {
	f, _ := ctx.Value(progressKey{}).(func(done, total int, bytes int64))
	return f
}

// CreateKeyAsync is CreateKey, except that a key whose keyset is larger than
// the async threshold is generated in the background: it validates
// everything first and returns a running Job (and a nil key). bg is the
// context the background work runs in, and bgRec the audit record its
// change commits with (the request's record was written when the job
// started).
func (c Call) CreateKeyAsync(ctx, bg context.Context, bgRec *AuditRecord, name, kindName string, p Policy) (*Key, *Version, *Job, error) {
	s := c.Service
	if err := ValidateName(name); err != nil {
		return nil, nil, nil, err
	}
	kind, err := s.kinds.Lookup(kindName)
	if err != nil {
		return nil, nil, nil, err
	}
	if !s.asyncWanted(kind, p) {
		k, v, err := c.CreateKey(ctx, name, kindName, p)
		return k, v, nil, err
	}
	if _, err := s.checkPolicy(kind, p); err != nil {
		return nil, nil, nil, err
	}
	if _, err := s.store.GetKey(ctx, name); err == nil {
		return nil, nil, nil, Errorf(KindAlreadyExists, "key %q already exists", name)
	}
	if err := s.generationSlotFree(); err != nil {
		return nil, nil, nil, err
	}
	j := s.newJob(name)
	go func() {
		k, _, err := s.createKey(context.WithValue(bg, progressKey{}, s.jobProgress(j)), name, kindName, p, auditFor(bgRec, name, 1))
		var v uint64
		if err == nil {
			v = k.Primary
		}
		s.finishJob(j, v, err)
	}()
	cp := *j
	return nil, nil, &cp, nil
}

// RotateAsync is Rotate, in the background for large keysets (see
// CreateKeyAsync).
func (c Call) RotateAsync(ctx, bg context.Context, bgRec *AuditRecord, name string) (*Key, *Version, *Job, error) {
	s := c.Service
	if err := ValidateName(name); err != nil {
		return nil, nil, nil, err
	}
	k, err := s.getKey(ctx, name)
	if err != nil {
		return nil, nil, nil, err
	}
	kind, err := s.kinds.Lookup(k.Kind)
	if err != nil {
		return nil, nil, nil, Wrap(KindInternal, "rotate", err)
	}
	if !s.asyncWanted(kind, k.Policy) {
		k, v, err := s.rotate(ctx, name, c.rec)
		return k, v, nil, err
	}
	if err := s.generationSlotFree(); err != nil {
		return nil, nil, nil, err
	}
	j := s.newJob(name)
	go func() {
		_, v, err := s.rotate(context.WithValue(bg, progressKey{}, s.jobProgress(j)), name, bgRec)
		var n uint64
		if err == nil {
			n = v.Number
		}
		s.finishJob(j, n, err)
	}()
	cp := *j
	return nil, nil, &cp, nil
}

// generationSlotFree refuses a background generation up front when all
// generation slots are taken (the generation itself checks again).
func (s *Service) generationSlotFree() error {
	if len(s.generations) >= cap(s.generations) {
		s.counts.genRefused.Add(1)
		return Errorf(KindExhausted, "%d HE keyset generation(s) already running; retry later", cap(s.generations))
	}
	return nil
}
