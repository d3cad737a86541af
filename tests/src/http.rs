//! A small HTTP server for tests (the OTLP receiver, the flaky S3 proxy): serves an axum
//! router on 127.0.0.1 from a thread of its own, and stops when dropped.

pub struct TestServer {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(app: axum::Router) -> TestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a test server");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let endpoint = format!("http://{}", listener.local_addr().expect("the test server's address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await; // a dropped sender also means stop
                    })
                    .await
                    .expect("the test server failed");
            });
        });
        TestServer { endpoint, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(()); // the server may have stopped already
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join(); // a panic in the server already failed the test
        }
    }
}
