package archive

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/kms"
)

// S3Config is an archive in an S3-compatible bucket, under Prefix.
type S3Config struct {
	// Endpoint is https://host[:port] (or http:// to loopback; the caller
	// checks it).
	Endpoint string
	Bucket   string
	Prefix   string // e.g. "kmsd/audit/": ends in "/" (or is empty)
	Region   string
	// AccessKeyID and SecretAccessKey sign requests (AWS Signature V4).
	AccessKeyID, SecretAccessKey, SessionToken string
	RootCAs                                    *x509.CertPool
}

// S3 is an archive in an S3-compatible bucket.
type S3 struct {
	c      *minio.Client
	bucket string
	prefix string
}

// OpenS3 connects and checks that the bucket exists.
func OpenS3(ctx context.Context, cfg S3Config) (*S3, error) {
	u, err := url.Parse(cfg.Endpoint)
	if err != nil || u.Host == "" {
		return nil, errors.New("s3 archive: the endpoint is not a URL")
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: cfg.RootCAs}
	tr.ResponseHeaderTimeout = time.Minute
	c, err := minio.New(u.Host, &minio.Options{
		Creds:        credentials.NewStaticV4(cfg.AccessKeyID, cfg.SecretAccessKey, cfg.SessionToken),
		Secure:       u.Scheme == "https",
		Region:       cfg.Region,
		BucketLookup: minio.BucketLookupPath,
		Transport:    tr,
	})
	if err != nil {
		return nil, fmt.Errorf("s3 archive: %w", err)
	}
	ok, err := c.BucketExists(ctx, cfg.Bucket)
	if err != nil {
		return nil, fmt.Errorf("s3 archive: bucket %q: %w", cfg.Bucket, err)
	}
	if !ok {
		return nil, fmt.Errorf("s3 archive: bucket %q does not exist (kmsd does not create it)", cfg.Bucket)
	}
	return &S3{c: c, bucket: cfg.Bucket, prefix: cfg.Prefix}, nil
}

func (s *S3) String() string { return "s3://" + s.bucket + "/" + s.prefix }

func (s *S3) name(path string) (string, error) {
	if _, err := layout.Parse(path); err != nil {
		return "", fmt.Errorf("%w: %q", err, path)
	}
	return s.prefix + path, nil
}

// Put uploads data and reads it back (S3 answers a PUT once the object is
// durable; the read-back checks the bytes stored are these). An immutable
// resource already there is compared, never overwritten.
func (s *S3) Put(ctx context.Context, path string, data []byte, immutable bool) error {
	name, err := s.name(path)
	if err != nil {
		return err
	}
	if immutable {
		have, err := s.get(ctx, name)
		switch {
		case err == nil && bytes.Equal(have, data):
			return nil // written before (a Sync cut short)
		case err == nil:
			return fmt.Errorf("%w: %s", ErrConflict, path)
		case !errors.Is(err, kms.ErrNotFound):
			return err
		}
	}
	if _, err := s.c.PutObject(ctx, s.bucket, name, bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{ContentType: "application/octet-stream"}); err != nil {
		return fmt.Errorf("s3 archive: put %s: %w", path, err)
	}
	back, err := s.get(ctx, name)
	if err != nil {
		return fmt.Errorf("s3 archive: read back %s: %w", path, err)
	}
	if sha256.Sum256(back) != sha256.Sum256(data) {
		return fmt.Errorf("s3 archive: %s reads back other bytes than were put", path)
	}
	return nil
}

func (s *S3) Get(ctx context.Context, path string) ([]byte, error) {
	name, err := s.name(path)
	if err != nil {
		return nil, err
	}
	return s.get(ctx, name)
}

func (s *S3) get(ctx context.Context, name string) ([]byte, error) {
	o, err := s.c.GetObject(ctx, s.bucket, name, minio.GetObjectOptions{})
	if err != nil {
		return nil, fmt.Errorf("s3 archive: get %s: %w", name, err)
	}
	defer o.Close()
	b, err := io.ReadAll(io.LimitReader(o, 1<<24))
	if err != nil {
		code := minio.ToErrorResponse(err).Code
		if code == minio.NoSuchKey || code == "NotFound" {
			return nil, kms.Wrap(kms.KindNotFound, "s3 archive", err)
		}
		return nil, fmt.Errorf("s3 archive: get %s: %w", name, err)
	}
	return b, nil
}
